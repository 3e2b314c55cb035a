"""Outbox records as table rows, and the rules that make writing them twice harmless.

The write-behind can hand the same record over more than once (several replicas drain one
outbox; a process can die between its commit and its acknowledgement), so every write is
idempotent by id, on either write path (SQLAlchemy in creditd.db.database for SQLite,
psycopg in creditd.db.postgres_writer for Postgres):

* a ledger entry or an event is inserted once; another copy with the same id is ignored,
  and a usage entry adds to the daily usage rollup only when it is inserted;
* a session row holds the newest state of its session. States are ordered by the session
  itself, not by clocks (replicas' clocks differ): a settlement is final, and an open
  session's grant only grows (each slice writes a state with a larger `granted_seconds`).
  So a state replaces the stored one when it is a settlement, or when neither is settled
  and it has granted at least as much. A late, stale slice never reopens a settled
  session nor shrinks an open one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import ReturningInsert

from creditd.db import tables as t
from creditd.domain.records import EventRecord, LedgerRecord, Record, SessionRecord
from creditd.domain.usage import UsageTotals, roll_up

Insert = postgresql.Insert | sqlite.Insert
SETTLED = "settled"

# Transactions that insert events hold this Postgres advisory lock from just before their
# event inserts until commit, so event seqs become visible in order and a poller reading
# `seq > last_seen` never skips an event that commits late.
EVENTS_LOCK = 0x63726564_6576  # "cred" "ev"


def epoch_us(seconds: float) -> int:
    return round(seconds * 1_000_000)


# -- rows ----------------------------------------------------------------------------------
# Each table's columns in the order of its values tuple (the seq columns are the database's).

ENTRY_COLUMNS = (
    "entry_id",
    "account_id",
    "balance_type",
    "kind",
    "topup_kind",
    "amount_micros",
    "free_micros",
    "purchased_micros",
    "usage_micros",
    "seconds",
    "created_at",
    "session_id",
    "message_id",
    "idempotency_key",
    "external_ref",
    "client_id",
    "provider",
    "destination_country",
)
EVENT_COLUMNS = (
    "event_id",
    "account_id",
    "type",
    "balance_type",
    "created_at",
    "amount_micros",
    "idempotency_key",
    "session_id",
    "reason",
    "attributes",
)
SESSION_COLUMNS = (
    "session_id",
    "client_id",
    "agency_id",
    "channel",
    "direction",
    "provider",
    "status",
    "granted_seconds",
    "billed_seconds",
    "reserved",
    "charged",
    "updated_at",
    "cutoff_reason",
    "started_at",
)


def entry_values(e: LedgerRecord) -> tuple[Any, ...]:
    topup_kind = None if e.topup_kind is None else int(e.topup_kind)
    return (
        e.entry_id,
        e.account_id,
        int(e.balance_type),
        int(e.kind),
        topup_kind,
        e.amount_micros,
        e.free_micros,
        e.purchased_micros,
        e.usage_micros,
        e.seconds,
        epoch_us(e.created_at),
        e.session_id,
        e.message_id,
        e.idempotency_key,
        e.external_ref,
        e.client_id,
        e.provider,
        e.destination_country,
    )


def event_values(e: EventRecord) -> tuple[Any, ...]:
    return (
        e.event_id,
        e.account_id,
        int(e.type),
        int(e.balance_type),
        epoch_us(e.created_at),
        e.amount_micros,
        e.idempotency_key,
        e.session_id,
        e.reason,
        dict(e.attributes),
    )


def session_values(s: SessionRecord) -> tuple[Any, ...]:
    return (
        s.session_id,
        s.client_id,
        s.agency_id,
        s.channel,
        s.direction,
        s.provider,
        s.status,
        s.granted_seconds,
        s.billed_seconds,
        dict(s.reserved),
        dict(s.charged),
        epoch_us(s.updated_at),
        s.cutoff_reason,
        epoch_us(s.started_at),
    )


def entry_row(e: LedgerRecord) -> dict[str, Any]:
    return dict(zip(ENTRY_COLUMNS, entry_values(e), strict=True))


def event_row(e: EventRecord) -> dict[str, Any]:
    return dict(zip(EVENT_COLUMNS, event_values(e), strict=True))


def session_row(s: SessionRecord) -> dict[str, Any]:
    return dict(zip(SESSION_COLUMNS, session_values(s), strict=True))


# -- one batch -----------------------------------------------------------------------------


def replaces(incoming: SessionRecord, stored: SessionRecord) -> bool:
    """Whether `incoming` is the newer state of the session (the rule of the module doc;
    session_upsert states it again for the database)."""
    return incoming.status == SETTLED or (
        stored.status != SETTLED and incoming.granted_seconds >= stored.granted_seconds
    )


@dataclass
class RecordBatch:
    """What one write-behind transaction writes: each entry and event once, in outbox order,
    and only the newest state of each session."""

    entries: list[LedgerRecord] = field(default_factory=list)
    events: list[EventRecord] = field(default_factory=list)
    sessions: list[SessionRecord] = field(default_factory=list)

    @classmethod
    def of(cls, records: Iterable[Record]) -> RecordBatch:
        entries: dict[str, LedgerRecord] = {}
        events: dict[str, EventRecord] = {}
        sessions: dict[tuple[str, str], SessionRecord] = {}  # session ids are unique per agency
        for record in records:
            if isinstance(record, LedgerRecord):
                entries.setdefault(record.entry_id, record)
            elif isinstance(record, EventRecord):
                events.setdefault(record.event_id, record)
            else:
                key = (record.agency_id, record.session_id)
                stored = sessions.get(key)
                if stored is None or replaces(record, stored):
                    sessions[key] = record
        return cls(list(entries.values()), list(events.values()), list(sessions.values()))

    def __bool__(self) -> bool:
        return bool(self.entries or self.events or self.sessions)


# -- statements ----------------------------------------------------------------------------
# Both write paths build their inserts with these, so the conflict rules exist once.


def entry_insert(insert: Insert) -> ReturningInsert[Any]:
    """Insert entries not written yet; returns the ids of those it inserted."""
    return insert.on_conflict_do_nothing(index_elements=["entry_id"]).returning(t.ledger_entries.c.entry_id)


def event_insert(insert: Insert) -> Insert:
    return insert.on_conflict_do_nothing(index_elements=["event_id"])


def usage_rows(entries: Iterable[LedgerRecord], inserted: Collection[str]) -> list[dict[str, Any]]:
    """Rows adding the usage of the entries this transaction inserted to the daily rollup
    (an entry written before is counted already), in key order so that concurrent writers
    lock rollup rows in the same order."""
    totals = roll_up([e for e in entries if e.entry_id in inserted])
    # vars(), not dataclasses.asdict(): both are flat, and asdict's deep copy cost 20 us a row.
    return [{**vars(key), **vars(value)} for key, value in sorted(totals.items(), key=lambda item: item[0])]


USAGE_SUMS = tuple(f.name for f in dataclasses.fields(UsageTotals))


def usage_upsert(insert: Insert) -> Insert:
    """Add to the rollup row of the key, or create it."""
    return insert.on_conflict_do_update(
        index_elements=[c.name for c in t.usage_daily.primary_key.columns],
        set_={name: t.usage_daily.c[name] + insert.excluded[name] for name in USAGE_SUMS},
    )


def session_upsert(insert: Insert) -> Insert:
    """Write a session's state over the stored one when it is newer (see `replaces`)."""
    stored, incoming = t.sessions.c, insert.excluded
    newer = sa.or_(
        incoming.status == SETTLED,
        sa.and_(stored.status != SETTLED, incoming.granted_seconds >= stored.granted_seconds),
    )
    key = ("agency_id", "session_id")
    return insert.on_conflict_do_update(
        index_elements=list(key),
        set_={name: incoming[name] for name in SESSION_COLUMNS if name not in key},
        where=newer,
    )
