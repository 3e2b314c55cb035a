"""What the client returns: small frozen dataclasses for balances and sessions.

Records with many fields (accounts, plans, API keys, ledger entries, usage rows) are returned
as the `creditd.v1` messages themselves; they are re-exported here. Events are dataclasses whose
enum fields are names ("EVENT_TYPE_REFILL_REQUESTED"), not numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from creditd_client.v1 import common_pb2, ledger_pb2, metering_pb2
from creditd_client.v1.account_pb2 import Account, ApiKey, CreateApiKeyResponse, Plan
from creditd_client.v1.ledger_pb2 import LedgerEntry, UsageRow

__all__ = [
    "Account",
    "ApiKey",
    "Authorization",
    "Balance",
    "Balances",
    "CreateApiKeyResponse",
    "Cutoff",
    "Event",
    "Grant",
    "LedgerEntry",
    "LowCreditWarning",
    "Plan",
    "SessionEvent",
    "SessionSummary",
    "SmsResult",
    "TopupResult",
    "UsageRow",
]


def _time(value: Timestamp, present: bool = True) -> datetime | None:
    if not present or (value.seconds == 0 and value.nanos == 0):
        return None
    return value.ToDatetime(tzinfo=UTC)


def enum_name(wrapper: Any, prefix: str, value: int) -> str:
    """The name of an enum number (BalanceType 1 -> BALANCE_TYPE_VOICE); empty for 0, the
    unspecified value; PREFIX_<number> for a number this client does not know yet."""
    if not value:
        return ""
    try:
        name: str = wrapper.Name(value)
    except ValueError:
        return f"{prefix}{value}"
    return name


def deny_reason_name(value: int) -> str:
    """The DenyReason name of a number (1 -> DENY_REASON_CLIENT_CREDITS_EXHAUSTED); empty for 0."""
    return enum_name(common_pb2.DenyReason, "DENY_REASON_", value)


@dataclass(frozen=True)
class Balance:
    """One balance (voice or SMS) of an account, in micro-credits."""

    free_micros: int
    purchased_micros: int
    reserved_micros: int
    available_micros: int
    period_used_micros: int
    usage_limit_micros: int
    period_start: datetime | None
    period_end: datetime | None
    has_wallet: bool

    @classmethod
    def from_proto(cls, message: common_pb2.Balance) -> Balance:
        return cls(
            free_micros=message.free_micros,
            purchased_micros=message.purchased_micros,
            reserved_micros=message.reserved_micros,
            available_micros=message.available_micros,
            period_used_micros=message.period_used_micros,
            usage_limit_micros=message.usage_limit_micros,
            period_start=_time(message.period_start, message.HasField("period_start")),
            period_end=_time(message.period_end, message.HasField("period_end")),
            has_wallet=message.has_wallet,
        )


@dataclass(frozen=True)
class Balances:
    """Both balances of an account."""

    account_id: str
    voice: Balance
    sms: Balance

    @classmethod
    def from_proto(cls, message: ledger_pb2.GetBalanceResponse | ledger_pb2.WatchBalanceResponse) -> Balances:
        return cls(message.account_id, Balance.from_proto(message.voice), Balance.from_proto(message.sms))


@dataclass(frozen=True)
class TopupResult:
    """The ledger entry of a top-up and the balance it left."""

    entry_id: str
    balance: Balance

    @classmethod
    def from_proto(cls, message: ledger_pb2.TopupResponse) -> TopupResult:
        return cls(message.entry_id, Balance.from_proto(message.balance))


@dataclass(frozen=True)
class Authorization:
    """The answer to Authorize. `deny_reason` is a DenyReason name, empty when allowed."""

    allowed: bool
    deny_reason: str
    granted_seconds: int
    max_seconds: int
    expires_at: datetime | None

    @classmethod
    def from_proto(cls, message: metering_pb2.AuthorizeResponse) -> Authorization:
        return cls(
            allowed=message.allowed,
            deny_reason=deny_reason_name(message.deny_reason),
            granted_seconds=message.granted_seconds,
            max_seconds=message.max_seconds,
            expires_at=_time(message.expires_at, message.HasField("expires_at")),
        )


@dataclass(frozen=True)
class Grant:
    """The call may run until `granted_seconds` (cumulative) after it was answered."""

    granted_seconds: int
    expires_at: datetime | None


@dataclass(frozen=True)
class LowCreditWarning:
    """The final grant ends in `remaining_seconds`: time to say goodbye."""

    remaining_seconds: int


@dataclass(frozen=True)
class Cutoff:
    """The server stopped the session (reason is a DenyReason name); it is settled."""

    reason: str
    billed_seconds: int


@dataclass(frozen=True)
class SessionSummary:
    """The session ended normally and is settled."""

    billed_seconds: int
    client_charged_micros: int
    agency_charged_micros: int
    messages_sent: int = 0
    messages_denied: int = 0


@dataclass(frozen=True)
class SmsResult:
    """The answer to one SMS: allowed and charged, or denied with a DenyReason name."""

    message_id: str
    allowed: bool
    deny_reason: str
    charged_micros: int


@dataclass(frozen=True)
class Event:
    """Something that happened to an account: a low balance, a refill request, a cutoff, a
    top-up. Enum fields are names; `balance_type` and `reason` are empty when they do not apply."""

    event_id: str
    account_id: str
    type: str  # e.g. "EVENT_TYPE_REFILL_REQUESTED"
    balance_type: str  # "BALANCE_TYPE_VOICE" or "BALANCE_TYPE_SMS"
    amount_micros: int
    idempotency_key: str  # of a refill request: the key of the Topup that pays for it
    session_id: str
    reason: str  # a DenyReason name
    created_at: datetime | None
    attributes: Mapping[str, str]

    @classmethod
    def from_proto(cls, message: ledger_pb2.Event) -> Event:
        return cls(
            event_id=message.event_id,
            account_id=message.account_id,
            type=enum_name(ledger_pb2.EventType, "EVENT_TYPE_", message.type),
            balance_type=enum_name(common_pb2.BalanceType, "BALANCE_TYPE_", message.balance_type),
            amount_micros=message.amount_micros,
            idempotency_key=message.idempotency_key,
            session_id=message.session_id,
            reason=deny_reason_name(message.reason),
            created_at=_time(message.created_at, message.HasField("created_at")),
            attributes=dict(message.attributes),
        )


SessionEvent = Grant | LowCreditWarning | SmsResult | Cutoff | SessionSummary
Final = Cutoff | SessionSummary


def session_event(message: metering_pb2.StreamUsageResponse) -> SessionEvent | None:
    """The client form of one message of a usage stream (None for an empty message)."""
    kind = message.WhichOneof("msg")
    if kind == "grant":
        grant = message.grant
        return Grant(grant.granted_seconds, _time(grant.expires_at, grant.HasField("expires_at")))
    if kind == "warning":
        return LowCreditWarning(message.warning.remaining_seconds)
    if kind == "sms_result":
        sms = message.sms_result
        return SmsResult(sms.message_id, sms.allowed, deny_reason_name(sms.deny_reason), sms.charged_micros)
    if kind == "cutoff":
        return Cutoff(deny_reason_name(message.cutoff.reason), message.cutoff.billed_seconds)
    if kind == "summary":
        s = message.summary
        return SessionSummary(
            s.billed_seconds, s.client_charged_micros, s.agency_charged_micros, s.messages_sent, s.messages_denied
        )
    return None
