"""Usage: what the usage entries of the ledger add up to, by UTC day and what they were for.

A usage entry debits one wallet for one settled call (its billed seconds) or one SMS (its
segments). Its free and purchased parts are negative in the ledger; here they are what was
consumed, so charged = free + purchased. usage_micros is what counted against the usage
limit, which for a client without a wallet (AGENCY_PAID) is the only non-zero amount.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from creditd.domain.records import EntryKind, LedgerRecord

DAY_SECONDS = 86_400


class UsageGroup(enum.IntEnum):
    # Values match creditd.v1.UsageGroup.
    CHANNEL = 1
    PROVIDER = 2
    DESTINATION_COUNTRY = 3
    CLIENT = 4
    DAY = 5


@dataclass
class UsageTotals:
    voice_seconds: int = 0
    sms_segments: int = 0
    sms_messages: int = 0
    free_micros: int = 0
    purchased_micros: int = 0
    usage_micros: int = 0

    @property
    def charged_micros(self) -> int:
        return self.free_micros + self.purchased_micros

    def add(self, other: UsageTotals) -> None:
        self.voice_seconds += other.voice_seconds
        self.sms_segments += other.sms_segments
        self.sms_messages += other.sms_messages
        self.free_micros += other.free_micros
        self.purchased_micros += other.purchased_micros
        self.usage_micros += other.usage_micros


@dataclass(frozen=True, order=True)
class UsageKey:
    """The finest grain usage is kept at. The channel of a usage entry is its balance type."""

    account_id: str
    balance_type: int
    day: int  # days since 1970-01-01 UTC
    client_id: str
    provider: str
    destination_country: str


def day_of(epoch_seconds: float) -> int:
    return int(epoch_seconds // DAY_SECONDS)


def usage_of(entry: LedgerRecord) -> tuple[UsageKey, UsageTotals] | None:
    """The contribution of one ledger entry to usage (None: it is not a usage entry)."""
    if entry.kind is EntryKind.VOICE_USAGE:
        quantity = UsageTotals(voice_seconds=entry.seconds)
    elif entry.kind is EntryKind.SMS_USAGE:
        quantity = UsageTotals(sms_segments=entry.seconds, sms_messages=1)
    else:
        return None
    quantity.free_micros = -entry.free_micros
    quantity.purchased_micros = -entry.purchased_micros
    quantity.usage_micros = entry.usage_micros
    key = UsageKey(
        account_id=entry.account_id,
        balance_type=int(entry.balance_type),
        day=day_of(entry.created_at),
        client_id=entry.client_id,
        provider=entry.provider,
        destination_country=entry.destination_country,
    )
    return key, quantity


def roll_up(entries: list[LedgerRecord]) -> dict[UsageKey, UsageTotals]:
    """The usage of a batch of entries, summed per key."""
    totals: dict[UsageKey, UsageTotals] = {}
    for entry in entries:
        found = usage_of(entry)
        if found is not None:
            key, quantity = found
            totals.setdefault(key, UsageTotals()).add(quantity)
    return totals
