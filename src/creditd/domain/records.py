"""What the hot path hands to the durable store: ledger entries, events, session states.

They are produced atomically with the balance change that caused them and written to the
database in batches (write-behind), each idempotent by its id.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field


class BalanceType(enum.IntEnum):
    # Values match creditd.v1.BalanceType.
    VOICE = 1
    SMS = 2


class EntryKind(enum.IntEnum):
    # Values match creditd.v1.LedgerEntryKind.
    TOPUP = 1
    VOICE_USAGE = 2
    SMS_USAGE = 3
    FREE_EXPIRY = 4
    FREE_ALLOWANCE = 5


class TopupKind(enum.IntEnum):
    # Values match creditd.v1.TopupKind.
    PURCHASE = 1
    GRANT = 2
    REFUND = 3
    AUTO_REFILL = 4


class EventType(enum.IntEnum):
    # Values match creditd.v1.EventType.
    LOW_BALANCE = 1
    REFILL_REQUESTED = 2
    LIMIT_REACHED = 3
    CUTOFF = 4
    TOPUP_APPLIED = 5
    FREE_CREDITS_EXPIRED = 6


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class LedgerRecord:
    """One signed change of one wallet. amount = free + purchased; usage counts against limits."""

    entry_id: str
    account_id: str
    balance_type: BalanceType
    kind: EntryKind
    amount_micros: int
    free_micros: int
    purchased_micros: int
    usage_micros: int
    created_at: float
    topup_kind: TopupKind | None = None
    session_id: str = ""
    message_id: str = ""
    idempotency_key: str = ""
    external_ref: str = ""
    seconds: int = 0  # the quantity billed: seconds of talk, or segments on an SMS balance
    # Usage entries: what the usage was for, so it can be summed by client, provider and country.
    client_id: str = ""
    provider: str = ""
    destination_country: str = ""


USAGE_KINDS = (EntryKind.VOICE_USAGE, EntryKind.SMS_USAGE)


@dataclass(frozen=True)
class EventRecord:
    event_id: str
    account_id: str
    type: EventType
    balance_type: BalanceType
    created_at: float
    amount_micros: int = 0
    idempotency_key: str = ""
    session_id: str = ""
    reason: int = 0  # creditd.v1.DenyReason
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SessionRecord:
    """The durable state of a voice or SMS session, written on every slice and at settlement."""

    session_id: str
    client_id: str
    agency_id: str
    channel: int  # creditd.v1.Channel
    direction: int  # creditd.v1.Direction
    provider: str
    status: str  # "open" or "settled"
    granted_seconds: int
    billed_seconds: int
    # account id -> micro-credits reserved by this session (open) or charged (settled)
    reserved: dict[str, int]
    charged: dict[str, int]
    updated_at: float
    cutoff_reason: int = 0
    started_at: float = 0.0  # when the call was answered (its first SessionStart); 0: not answered


Record = LedgerRecord | EventRecord | SessionRecord


class DenyReason(enum.IntEnum):
    # Values match creditd.v1.DenyReason.
    NONE = 0
    CLIENT_CREDITS_EXHAUSTED = 1
    AGENCY_CREDITS_EXHAUSTED = 2
    USAGE_LIMIT_REACHED = 3
    SUBSCRIPTION_INACTIVE = 4
    CONCURRENCY_LIMIT_REACHED = 5
    SESSION_ABANDONED = 6
    SERVICE_UNAVAILABLE = 7
