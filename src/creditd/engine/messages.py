"""What a usage stream carries, independent of the wire format."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Start:
    session_id: str
    client_id: str
    channel: int
    direction: int


@dataclass(slots=True)
class Usage:
    seconds_used: int


@dataclass(slots=True)
class Sms:
    message_id: str
    destination_country: str
    segments: int


@dataclass(slots=True)
class End:
    seconds_used: int


Request = Start | Usage | Sms | End


@dataclass(slots=True)
class GrantMsg:
    granted_seconds: int
    expires_at: float


@dataclass(slots=True)
class WarningMsg:
    remaining_seconds: int


@dataclass(slots=True)
class SmsResultMsg:
    message_id: str
    allowed: bool
    deny_reason: int
    charged_micros: int


@dataclass(slots=True)
class CutoffMsg:
    reason: int
    billed_seconds: int


@dataclass(slots=True)
class SummaryMsg:
    billed_seconds: int
    client_charged_micros: int
    agency_charged_micros: int
    messages_sent: int = 0
    messages_denied: int = 0


Message = GrantMsg | WarningMsg | SmsResultMsg | CutoffMsg | SummaryMsg
TERMINAL = (CutoffMsg, SummaryMsg)


@dataclass(slots=True)
class AuthorizeResult:
    allowed: bool
    deny_reason: int = 0
    granted_seconds: int = 0
    max_seconds: int = 0
    expires_at: float = 0.0
