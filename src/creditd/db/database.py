"""The durable store: catalog, API keys, ledger, events and sessions, on SQLite or Postgres.

Every method is one transaction. The schema comes from the Alembic migrations
(creditd.db.migrate.upgrade); this class never creates tables itself. Connection failures
surface as StoreUnavailable so callers fail closed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from creditd.db import outbox
from creditd.db import tables as t
from creditd.db.outbox import RecordBatch
from creditd.db.outbox import epoch_us as _us
from creditd.db.postgres_writer import PostgresWriter
from creditd.domain.accounts import Account, AccountKind, ApiKey, BalanceSettings, BillingMode, Plan, Role
from creditd.domain.rates import RateCard
from creditd.domain.records import (
    USAGE_KINDS,
    BalanceType,
    EntryKind,
    EventRecord,
    EventType,
    LedgerRecord,
    Record,
    SessionRecord,
    TopupKind,
)
from creditd.domain.usage import DAY_SECONDS, UsageGroup, UsageTotals
from creditd.domain.wallet import RefillSettings
from creditd.errors import AlreadyExists, InvalidArgument, NotFound, StoreUnavailable

_UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError, OSError)
REBUILD_FENCE_SECONDS = 10.0  # how long a rebuild waits for the write-behind batches in flight


def _ts(micros: int) -> float:
    return micros / 1_000_000


def _sum(value: Any) -> int:
    return int(value or 0)  # Postgres sums bigints as numeric


# -- serialization -------------------------------------------------------------------------


def _rates_json(rates: RateCard) -> dict[str, Any]:
    return {
        "voice": dict(rates.voice),
        "default_voice": rates.default_voice,
        "sms": dict(rates.sms),
        "default_sms": rates.default_sms,
    }


def _rates(data: Mapping[str, Any]) -> RateCard:
    return RateCard(
        voice={str(k): int(v) for k, v in data["voice"].items()},
        default_voice=int(data["default_voice"]),
        sms={str(k): int(v) for k, v in data["sms"].items()},
        default_sms=int(data["default_sms"]),
    )


def _account_row(a: Account) -> dict[str, Any]:
    return {
        "account_id": a.account_id,
        "kind": int(a.kind),
        "agency_id": a.agency_id,
        "display_name": a.display_name,
        "plan_id": a.plan_id,
        "billing_mode": int(a.billing_mode),
        "inbound_active": a.inbound_active,
        "outbound_active": a.outbound_active,
        "anchor_day": a.anchor_day,
        "free_voice_micros": a.free_voice_micros,
        "free_sms_micros": a.free_sms_micros,
        "platform_rates": None if a.platform_rates is None else _rates_json(a.platform_rates),
        "settings": {
            str(int(bt)): {
                "refill": dataclasses.asdict(s.refill),
                "low_balance_threshold_micros": s.low_balance_threshold_micros,
            }
            for bt, s in a.settings.items()
        },
        "created_at": _us(a.created_at),
    }


def _account(r: Mapping[Any, Any]) -> Account:
    settings = {
        BalanceType(int(bt)): BalanceSettings(
            refill=RefillSettings(**s["refill"]),
            low_balance_threshold_micros=int(s["low_balance_threshold_micros"]),
        )
        for bt, s in r["settings"].items()
    }
    return Account(
        account_id=r["account_id"],
        kind=AccountKind(r["kind"]),
        agency_id=r["agency_id"],
        display_name=r["display_name"],
        plan_id=r["plan_id"],
        billing_mode=BillingMode(r["billing_mode"]),
        inbound_active=bool(r["inbound_active"]),
        outbound_active=bool(r["outbound_active"]),
        anchor_day=r["anchor_day"],
        free_voice_micros=r["free_voice_micros"],
        free_sms_micros=r["free_sms_micros"],
        platform_rates=None if r["platform_rates"] is None else _rates(r["platform_rates"]),
        settings=settings,
        created_at=_ts(r["created_at"]),
    )


def _plan_row(p: Plan) -> dict[str, Any]:
    row = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
    row["rates"] = _rates_json(p.rates)
    return row


def _plan(r: Mapping[Any, Any]) -> Plan:
    return Plan(**{**r, "rates": _rates(r["rates"])})


def _key_row(k: ApiKey) -> dict[str, Any]:
    return {
        "key_id": k.key_id,
        "role": int(k.role),
        "account_id": k.account_id,
        "secret_sha256": k.secret_sha256,
        "description": k.description,
        "created_at": _us(k.created_at),
        "revoked_at": None if k.revoked_at is None else _us(k.revoked_at),
    }


def _key(r: Mapping[Any, Any]) -> ApiKey:
    return ApiKey(
        key_id=r["key_id"],
        role=Role(r["role"]),
        account_id=r["account_id"],
        secret_sha256=r["secret_sha256"],
        description=r["description"],
        created_at=_ts(r["created_at"]),
        revoked_at=None if r["revoked_at"] is None else _ts(r["revoked_at"]),
    )


def _entry(r: Mapping[Any, Any]) -> LedgerRecord:
    row = dict(r)
    del row["seq"]
    row.update(
        balance_type=BalanceType(r["balance_type"]),
        kind=EntryKind(r["kind"]),
        topup_kind=None if r["topup_kind"] is None else TopupKind(r["topup_kind"]),
        created_at=_ts(r["created_at"]),
    )
    return LedgerRecord(**row)


def _event(r: Mapping[Any, Any]) -> EventRecord:
    row = dict(r)
    del row["seq"]
    row.update(
        type=EventType(r["type"]),
        balance_type=BalanceType(r["balance_type"]),
        created_at=_ts(r["created_at"]),
    )
    return EventRecord(**row)


def _session(r: Mapping[Any, Any]) -> SessionRecord:
    return SessionRecord(**{**r, "updated_at": _ts(r["updated_at"]), "started_at": _ts(r["started_at"])})


def _cursor(cursor: str | None) -> int | None:
    if not cursor:
        return None
    value = int(cursor) if cursor.isascii() and cursor.isdigit() and len(cursor) <= 19 else 0
    if not 0 < value < 2**63:  # seqs are BIGINT
        raise InvalidArgument("malformed page cursor", field="page_token")
    return value


def _check_limit(limit: int) -> None:
    if limit <= 0:
        raise InvalidArgument("page size must be positive", field="page_size")


# -- the store -----------------------------------------------------------------------------


class Database:
    def __init__(self, url: str) -> None:
        self._url = url
        self._engine = create_async_engine(url, pool_pre_ping=True)
        self._dialect = self._engine.dialect.name
        if self._dialect not in ("postgresql", "sqlite"):
            raise ValueError(f"unsupported database dialect {self._dialect!r}")
        if self._dialect == "sqlite":
            sa_event.listen(self._engine.sync_engine, "connect", _sqlite_pragmas)
        # The write-behind's batches go through psycopg directly on Postgres; SQLite (the
        # embedded default) writes them through SQLAlchemy. Both follow creditd.db.outbox.
        self._postgres_writer = PostgresWriter(url) if self._dialect == "postgresql" else None
        # Built once: a statement is a graph of objects holding each other, which only the
        # cycle collector frees (or never, if it froze them in flight: creditd.gc_tuning).
        self._entry_insert = outbox.entry_insert(self._insert(t.ledger_entries))
        self._usage_upsert = outbox.usage_upsert(self._insert(t.usage_daily))
        self._session_upsert = outbox.session_upsert(self._insert(t.sessions))
        self._event_insert = outbox.event_insert(self._insert(t.events))

    @property
    def url(self) -> str:
        return self._url

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self._engine.begin() as conn:
                yield conn
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"database unavailable: {exc}") from exc

    def _insert(self, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
        return postgresql.insert(table) if self._dialect == "postgresql" else sqlite.insert(table)

    async def ping(self) -> None:
        async with self._tx() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def close(self) -> None:
        if self._postgres_writer is not None:
            await self._postgres_writer.close()
        await self._engine.dispose()

    # -- catalog ---------------------------------------------------------------------------

    async def insert_account(self, account: Account, records: Sequence[Record] = ()) -> None:
        async with self._tx() as conn:
            try:
                await conn.execute(sa.insert(t.accounts), _account_row(account))
            except sa.exc.IntegrityError:
                raise AlreadyExists(
                    f"account {account.account_id} already exists", account_id=account.account_id
                ) from None
            await self._write(conn, RecordBatch.of(records))

    async def update_account(self, account: Account) -> None:
        row = _account_row(account)
        async with self._tx() as conn:
            result = await conn.execute(
                sa.update(t.accounts).where(t.accounts.c.account_id == row.pop("account_id")), row
            )
        if result.rowcount == 0:
            raise NotFound(f"account {account.account_id} not found", account_id=account.account_id)

    async def get_account(self, account_id: str) -> Account | None:
        async with self._tx() as conn:
            result = await conn.execute(sa.select(t.accounts).where(t.accounts.c.account_id == account_id))
            row = result.mappings().first()
        return None if row is None else _account(row)

    async def list_accounts(self) -> list[Account]:
        async with self._tx() as conn:
            result = await conn.execute(sa.select(t.accounts).order_by(t.accounts.c.account_id))
            return [_account(r) for r in result.mappings()]

    async def page_accounts(self, agency_id: str | None, limit: int, after: str | None) -> list[Account]:
        """Up to `limit` accounts by id after `after`: the agency's clients, or (None) the agencies."""
        _check_limit(limit)
        c = t.accounts.c
        if agency_id is None:
            query = sa.select(t.accounts).where(c.kind == int(AccountKind.AGENCY))
        else:
            query = sa.select(t.accounts).where(c.agency_id == agency_id, c.kind == int(AccountKind.CLIENT))
        if after is not None:
            query = query.where(c.account_id > after)
        async with self._tx() as conn:
            result = await conn.execute(query.order_by(c.account_id).limit(limit))
            return [_account(r) for r in result.mappings()]

    async def page_plans(self, agency_id: str, limit: int, after: str | None) -> list[Plan]:
        """Up to `limit` plans of the agency by plan id after `after`."""
        _check_limit(limit)
        c = t.plans.c
        query = sa.select(t.plans).where(c.agency_id == agency_id)
        if after is not None:
            query = query.where(c.plan_id > after)
        async with self._tx() as conn:
            result = await conn.execute(query.order_by(c.plan_id).limit(limit))
            return [_plan(r) for r in result.mappings()]

    async def insert_plan(self, plan: Plan) -> None:
        async with self._tx() as conn:
            try:
                await conn.execute(sa.insert(t.plans), _plan_row(plan))
            except sa.exc.IntegrityError:
                raise AlreadyExists(
                    f"plan {plan.plan_id} already exists", agency_id=plan.agency_id, plan_id=plan.plan_id
                ) from None

    async def update_plan(self, plan: Plan) -> None:
        row = _plan_row(plan)
        key = sa.and_(t.plans.c.agency_id == row.pop("agency_id"), t.plans.c.plan_id == row.pop("plan_id"))
        async with self._tx() as conn:
            result = await conn.execute(sa.update(t.plans).where(key), row)
        if result.rowcount == 0:
            raise NotFound(f"plan {plan.plan_id} not found", agency_id=plan.agency_id, plan_id=plan.plan_id)

    async def get_plan(self, agency_id: str, plan_id: str) -> Plan | None:
        query = sa.select(t.plans).where(t.plans.c.agency_id == agency_id, t.plans.c.plan_id == plan_id)
        async with self._tx() as conn:
            row = (await conn.execute(query)).mappings().first()
        return None if row is None else _plan(row)

    async def list_plans(self) -> list[Plan]:
        async with self._tx() as conn:
            result = await conn.execute(sa.select(t.plans).order_by(t.plans.c.agency_id, t.plans.c.plan_id))
            return [_plan(r) for r in result.mappings()]

    # -- API keys --------------------------------------------------------------------------

    async def insert_api_key(self, key: ApiKey) -> None:
        async with self._tx() as conn:
            try:
                await conn.execute(sa.insert(t.api_keys), _key_row(key))
            except sa.exc.IntegrityError:
                raise AlreadyExists(f"API key {key.key_id} already exists", key_id=key.key_id) from None

    async def get_api_key(self, key_id: str) -> ApiKey | None:
        async with self._tx() as conn:
            result = await conn.execute(sa.select(t.api_keys).where(t.api_keys.c.key_id == key_id))
            row = result.mappings().first()
        return None if row is None else _key(row)

    async def revoke_api_key(self, key_id: str, now: float) -> ApiKey | None:
        """Revoke a key (a key revoked before keeps its first revocation time)."""
        c = t.api_keys.c
        async with self._tx() as conn:
            await conn.execute(
                sa.update(t.api_keys).where(c.key_id == key_id, c.revoked_at.is_(None)).values(revoked_at=_us(now))
            )
            row = (await conn.execute(sa.select(t.api_keys).where(c.key_id == key_id))).mappings().first()
        return None if row is None else _key(row)

    async def list_api_keys(self, account_id: str | None = None) -> list[ApiKey]:
        query = sa.select(t.api_keys).order_by(t.api_keys.c.created_at, t.api_keys.c.key_id)
        if account_id is not None:
            query = query.where(t.api_keys.c.account_id == account_id)
        async with self._tx() as conn:
            return [_key(r) for r in (await conn.execute(query)).mappings()]

    # -- ledger ----------------------------------------------------------------------------

    async def insert_topup(
        self, agency_id: str, entry: LedgerRecord, fingerprint: str, event: EventRecord
    ) -> tuple[LedgerRecord, str, bool]:
        """Record a top-up exactly once per idempotency key of the agency (the agency of the
        credited account: an agency and its clients share one set of keys).

        Returns (entry, fingerprint, True) when this call wrote it, else the entry and the
        fingerprint of the first call with the key, and False.
        """
        if not entry.idempotency_key:
            raise InvalidArgument("a top-up needs an idempotency key", field="idempotency_key")
        try:
            async with self._tx() as conn:
                await conn.execute(
                    sa.insert(t.idempotency_keys),
                    {
                        "agency_id": agency_id,
                        "idempotency_key": entry.idempotency_key,
                        "fingerprint": fingerprint,
                        "entry_id": entry.entry_id,
                        "created_at": _us(entry.created_at),
                    },
                )
                await conn.execute(sa.insert(t.ledger_entries), outbox.entry_row(entry))
                await self._insert_events(conn, [outbox.event_row(event)])
            return entry, fingerprint, True
        except sa.exc.IntegrityError:
            pass
        k, e = t.idempotency_keys, t.ledger_entries
        query = (
            sa.select(k.c.fingerprint, e)
            .join(e, e.c.entry_id == k.c.entry_id)
            .where(k.c.agency_id == agency_id, k.c.idempotency_key == entry.idempotency_key)
        )
        async with self._tx() as conn:
            row = (await conn.execute(query)).mappings().first()
        if row is None:  # the conflict was not on the key (e.g. a reused entry id)
            raise AlreadyExists(f"ledger entry {entry.entry_id} already exists", entry_id=entry.entry_id)
        original = dict(row)
        original_fingerprint = str(original.pop("fingerprint"))
        return _entry(original), original_fingerprint, False

    async def write_records(self, records: Sequence[Record]) -> None:
        """Write outbox records in one transaction; records already written (by id) are left
        as they are, and a session keeps its newest state (see creditd.db.outbox)."""
        batch = RecordBatch.of(records)
        if not batch:
            return
        if self._postgres_writer is not None:
            await self._postgres_writer.write(batch)
            return
        async with self._tx() as conn:
            await self._write(conn, batch)

    @contextlib.asynccontextmanager
    async def write_fence(self) -> AsyncIterator[None]:
        """Hold the write-behind fence for a take from the hot store and the `write_records`
        of what it took (see creditd.db.postgres_writer). SQLite: nothing to hold (one
        process)."""
        if self._postgres_writer is None:
            yield
            return
        async with self._postgres_writer.fence():
            yield

    @contextlib.asynccontextmanager
    async def rebuild_fence(self, wait_seconds: float = REBUILD_FENCE_SECONDS) -> AsyncIterator[None]:
        """Hold the write-behind fence alone while the hot store is rebuilt: no write-behind
        of any replica commits records it took before, or takes any, meanwhile."""
        if self._postgres_writer is None:
            yield
            return
        async with self._postgres_writer.exclusive_fence(wait_seconds):
            yield

    async def _write(self, conn: AsyncConnection, batch: RecordBatch) -> None:
        if batch.entries:
            result = await conn.execute(self._entry_insert, [outbox.entry_row(e) for e in batch.entries])
            usage = outbox.usage_rows(batch.entries, set(result.scalars()))
            if usage:
                await conn.execute(self._usage_upsert, usage)
        if batch.sessions:
            await conn.execute(self._session_upsert, [outbox.session_row(s) for s in batch.sessions])
        if batch.events:
            await self._insert_events(conn, [outbox.event_row(e) for e in batch.events])

    async def _insert_events(self, conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
        """Insert events last in a transaction (see creditd.db.outbox.EVENTS_LOCK)."""
        if self._dialect == "postgresql":
            await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(outbox.EVENTS_LOCK)))
        await conn.execute(self._event_insert, rows)

    async def list_ledger(
        self, account_id: str, balance_type: BalanceType | None, limit: int, cursor: str | None
    ) -> tuple[list[LedgerRecord], str | None]:
        """A page of an account's ledger, newest first, and the cursor of the next page."""
        c = t.ledger_entries.c
        query = sa.select(t.ledger_entries).where(c.account_id == account_id)
        if balance_type is not None:
            query = query.where(c.balance_type == int(balance_type))
        rows = await self._page(query, c.seq, limit, cursor)
        return [_entry(r) for r in rows[:limit]], _next_cursor(rows, limit)

    async def list_events(
        self, account_ids: Sequence[str], limit: int, cursor: str | None
    ) -> tuple[list[EventRecord], str | None]:
        """A page of the accounts' events, newest first, and the cursor of the next page."""
        if not account_ids:
            _check_limit(limit)
            return [], None
        query = sa.select(t.events).where(t.events.c.account_id.in_(list(account_ids)))
        rows = await self._page(query, t.events.c.seq, limit, cursor)
        return [_event(r) for r in rows[:limit]], _next_cursor(rows, limit)

    async def _page(
        self, query: sa.Select[Any], seq: sa.ColumnElement[int], limit: int, cursor: str | None
    ) -> list[sa.RowMapping]:
        _check_limit(limit)
        before = _cursor(cursor)
        if before is not None:
            query = query.where(seq < before)
        async with self._tx() as conn:
            result = await conn.execute(query.order_by(seq.desc()).limit(limit + 1))
            return list(result.mappings())

    async def events_after(
        self, account_ids: Sequence[str], after_seq: int, limit: int = 1000
    ) -> tuple[list[EventRecord], int]:
        """Events with seq > after_seq, oldest first (at most `limit`), and the highest seq seen.

        after_seq < 0 returns no events, only the accounts' current highest seq (0: none).
        """
        c = t.events.c
        ids = list(account_ids)
        if not ids:
            return [], max(after_seq, 0)
        async with self._tx() as conn:
            if after_seq < 0:
                top = await conn.scalar(sa.select(sa.func.max(c.seq)).where(c.account_id.in_(ids)))
                return [], _sum(top)
            query = sa.select(t.events).where(c.account_id.in_(ids), c.seq > after_seq).order_by(c.seq).limit(limit)
            rows = list((await conn.execute(query)).mappings())
        return [_event(r) for r in rows], (int(rows[-1]["seq"]) if rows else after_seq)

    async def usage(
        self,
        account_id: str,
        balance_types: Sequence[BalanceType],
        since_us: int,
        until_us: int,
        groups: Sequence[UsageGroup],
    ) -> dict[tuple[object, ...], UsageTotals]:
        """The account's usage in [since_us, until_us) (epoch microseconds), summed per value of
        `groups` (the key tuple follows their order; no groups: one total under ()).

        Whole UTC days come from the daily rollup; the parts of days at either end from the
        ledger's (account, balance type, time) index. No call reads more than two days of entries.
        """
        day = DAY_SECONDS * 1_000_000
        first_day, last_day = -(-since_us // day), until_us // day  # whole days: [first_day, last_day)
        kinds = [int(b) for b in balance_types]
        selects: list[sa.Select[Any]] = []
        if first_day < last_day:
            selects.append(self._rollup_query(account_id, kinds, first_day, last_day, groups))
            edges = [(since_us, first_day * day), (last_day * day, until_us)]
        else:
            edges = [(since_us, until_us)]
        selects += [self._ledger_usage_query(account_id, kinds, a, b, groups) for a, b in edges if a < b]
        totals: dict[tuple[object, ...], UsageTotals] = {}
        async with self._tx() as conn:
            for query in selects:
                for row in (await conn.execute(query)).all():
                    key = tuple(row[: len(groups)])
                    sums = [_sum(v) for v in row[len(groups) :]]
                    totals.setdefault(key, UsageTotals()).add(UsageTotals(*sums))
        return totals

    def _rollup_query(
        self, account_id: str, kinds: list[int], first_day: int, last_day: int, groups: Sequence[UsageGroup]
    ) -> sa.Select[Any]:
        c = t.usage_daily.c
        columns = {
            UsageGroup.CHANNEL: c.balance_type,
            UsageGroup.PROVIDER: c.provider,
            UsageGroup.DESTINATION_COUNTRY: c.destination_country,
            UsageGroup.CLIENT: c.client_id,
            UsageGroup.DAY: c.day,
        }
        keys = [columns[g] for g in groups]
        sums = [sa.func.sum(c[name]) for name in _USAGE_SUMS]
        return (
            sa.select(*keys, *sums)
            .where(c.account_id == account_id, c.balance_type.in_(kinds), c.day >= first_day, c.day < last_day)
            .group_by(*keys)
        )

    def _ledger_usage_query(
        self, account_id: str, kinds: list[int], since_us: int, until_us: int, groups: Sequence[UsageGroup]
    ) -> sa.Select[Any]:
        c = t.ledger_entries.c
        day = sa.cast(c.created_at // (DAY_SECONDS * 1_000_000), sa.Integer)  # integer division: times are >= 0
        columns = {
            UsageGroup.CHANNEL: c.balance_type,
            UsageGroup.PROVIDER: c.provider,
            UsageGroup.DESTINATION_COUNTRY: c.destination_country,
            UsageGroup.CLIENT: c.client_id,
            UsageGroup.DAY: day,
        }
        keys = [columns[g] for g in groups]
        voice, sms = c.kind == int(EntryKind.VOICE_USAGE), c.kind == int(EntryKind.SMS_USAGE)
        sums = [
            sa.func.sum(sa.case((voice, c.seconds), else_=0)),
            sa.func.sum(sa.case((sms, c.seconds), else_=0)),
            sa.func.sum(sa.case((sms, 1), else_=0)),
            -sa.func.sum(c.free_micros),
            -sa.func.sum(c.purchased_micros),
            sa.func.sum(c.usage_micros),
        ]
        return (
            sa.select(*keys, *sums)
            .where(
                c.account_id == account_id,
                c.balance_type.in_(kinds),
                c.created_at >= since_us,
                c.created_at < until_us,
                c.kind.in_([int(k) for k in USAGE_KINDS]),
            )
            .group_by(*keys)
        )

    async def get_ledger_entry(self, entry_id: str) -> LedgerRecord | None:
        query = sa.select(t.ledger_entries).where(t.ledger_entries.c.entry_id == entry_id)
        async with self._tx() as conn:
            row = (await conn.execute(query)).mappings().first()
        return None if row is None else _entry(row)

    # -- rebuilding hot state --------------------------------------------------------------

    async def wallet_totals(self) -> dict[tuple[str, BalanceType], tuple[int, int]]:
        """(account, balance) -> (free, purchased) micro-credits, summed over the whole ledger."""
        c = t.ledger_entries.c
        query = sa.select(
            c.account_id, c.balance_type, sa.func.sum(c.free_micros), sa.func.sum(c.purchased_micros)
        ).group_by(c.account_id, c.balance_type)
        async with self._tx() as conn:
            rows = (await conn.execute(query)).all()
        return {(str(a), BalanceType(b)): (_sum(free), _sum(purchased)) for a, b, free, purchased in rows}

    async def usage_since(self, account_id: str, balance_type: BalanceType, since: float) -> int:
        c = t.ledger_entries.c
        query = sa.select(sa.func.sum(c.usage_micros)).where(
            c.account_id == account_id, c.balance_type == int(balance_type), c.created_at >= _us(since)
        )
        async with self._tx() as conn:
            return _sum(await conn.scalar(query))

    async def topup_entry_ids(self) -> list[tuple[str, str]]:
        """(account id, entry id) of every top-up: what a rebuilt hot store already holds."""
        c = t.ledger_entries.c
        query = sa.select(c.account_id, c.entry_id).where(c.kind == int(EntryKind.TOPUP))
        async with self._tx() as conn:
            return [(str(a), str(e)) for a, e in (await conn.execute(query)).all()]

    async def period_mark(self, account_id: str, balance_type: BalanceType) -> float | None:
        """When the account's newest period began to be recorded: its last free allowance or expiry."""
        c = t.ledger_entries.c
        query = sa.select(sa.func.max(c.created_at)).where(
            c.account_id == account_id,
            c.balance_type == int(balance_type),
            c.kind.in_([int(EntryKind.FREE_ALLOWANCE), int(EntryKind.FREE_EXPIRY)]),
        )
        async with self._tx() as conn:
            value = await conn.scalar(query)
        return None if value is None else int(value) / 1_000_000

    async def count_events_since(
        self, account_id: str, balance_type: BalanceType, type_: EventType, since: float
    ) -> int:
        c = t.events.c
        query = sa.select(sa.func.count()).where(
            c.account_id == account_id,
            c.balance_type == int(balance_type),
            c.type == int(type_),
            c.created_at >= _us(since),
        )
        async with self._tx() as conn:
            return _sum(await conn.scalar(query))

    async def open_sessions(self) -> list[SessionRecord]:
        c = t.sessions.c
        query = sa.select(t.sessions).where(c.status == "open").order_by(c.agency_id, c.session_id)
        async with self._tx() as conn:
            return [_session(r) for r in (await conn.execute(query)).mappings()]

    async def get_session(self, agency_id: str, session_id: str) -> SessionRecord | None:
        c = t.sessions.c
        async with self._tx() as conn:
            result = await conn.execute(
                sa.select(t.sessions).where(c.agency_id == agency_id, c.session_id == session_id)
            )
            row = result.mappings().first()
        return None if row is None else _session(row)

    async def sms_message_ids(self, since: float) -> set[str]:
        """message_id of every SMS usage entry created at or after `since`."""
        c = t.ledger_entries.c
        query = sa.select(c.message_id).where(c.kind == int(EntryKind.SMS_USAGE), c.created_at >= _us(since)).distinct()
        async with self._tx() as conn:
            return {str(m) for m in (await conn.scalars(query))}


# The order of UsageTotals' fields.
_USAGE_SUMS = ("voice_seconds", "sms_segments", "sms_messages", "free_micros", "purchased_micros", "usage_micros")


def _next_cursor(rows: list[sa.RowMapping], limit: int) -> str | None:
    return str(rows[limit - 1]["seq"]) if len(rows) > limit else None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()
