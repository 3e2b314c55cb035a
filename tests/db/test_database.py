"""The durable store against a temporary SQLite file and a real, freshly created Postgres database."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from creditd.db import Database, outbox, tables
from creditd.db.migrate import downgrade, upgrade
from creditd.db.outbox import RecordBatch
from creditd.db.tables import metadata
from creditd.domain.accounts import (
    Account,
    AccountKind,
    ApiKey,
    BalanceSettings,
    BillingMode,
    Plan,
    Role,
)
from creditd.domain.rates import RateCard
from creditd.domain.records import (
    BalanceType,
    EntryKind,
    EventRecord,
    EventType,
    LedgerRecord,
    SessionRecord,
    TopupKind,
    new_id,
)
from creditd.domain.wallet import RefillSettings
from creditd.errors import AlreadyExists, InvalidArgument, NotFound, StoreUnavailable
from tests import services

VOICE, SMS = BalanceType.VOICE, BalanceType.SMS
T0 = 1_700_000_000.0  # every timestamp below is T0 plus a multiple of 1/4 s: exact in binary


def entry(account: str, free: int = 0, purchased: int = 0, usage: int = 0, **kw: Any) -> LedgerRecord:
    fields: dict[str, Any] = {
        "entry_id": new_id(),
        "account_id": account,
        "balance_type": VOICE,
        "kind": EntryKind.VOICE_USAGE,
        "amount_micros": free + purchased,
        "free_micros": free,
        "purchased_micros": purchased,
        "usage_micros": usage,
        "created_at": T0,
    }
    return LedgerRecord(**{**fields, **kw})


def sms(account: str, message_id: str, at: float) -> LedgerRecord:
    return entry(account, usage=80, balance_type=SMS, kind=EntryKind.SMS_USAGE, message_id=message_id, created_at=at)


def event(account: str, type_: EventType = EventType.LOW_BALANCE, **kw: Any) -> EventRecord:
    fields: dict[str, Any] = {
        "event_id": new_id(),
        "account_id": account,
        "type": type_,
        "balance_type": VOICE,
        "created_at": T0,
    }
    return EventRecord(**{**fields, **kw})


def topup(account: str, key: str, micros: int) -> tuple[LedgerRecord, EventRecord]:
    e = entry(
        account,
        purchased=micros,
        kind=EntryKind.TOPUP,
        topup_kind=TopupKind.PURCHASE,
        idempotency_key=key,
        external_ref="stripe:pi_1",
    )
    return e, event(account, EventType.TOPUP_APPLIED, amount_micros=micros, idempotency_key=key)


def session(sid: str, status: str, granted: int, at: float, **kw: Any) -> SessionRecord:
    fields: dict[str, Any] = {
        "session_id": sid,
        "client_id": "c1",
        "agency_id": "a1",
        "channel": 1,
        "direction": 1,
        "provider": "deepgram",
        "status": status,
        "granted_seconds": granted,
        "billed_seconds": 0,
        "reserved": {"c1": granted * 1000, "a1": granted * 500},
        "charged": {},
        "updated_at": at,
    }
    return SessionRecord(**{**fields, **kw})


def agency(account_id: str = "a1") -> Account:
    return Account(
        account_id=account_id,
        kind=AccountKind.AGENCY,
        agency_id=account_id,
        display_name="Acme Reception",
        free_voice_micros=0,  # a trial agency: 0 is a real value, not "default"
        platform_rates=RateCard(voice={"elevenlabs": 2_000_000}, default_voice=1_000_000, sms={"US": 166_000}),
        settings={
            VOICE: BalanceSettings(
                refill=RefillSettings(True, 5_000_000, 20_000_000, 0, 3),
                low_balance_threshold_micros=7_000_000,
            )
        },
        created_at=T0 + 0.25,
    )


def _sync_engine(database_url: str) -> sa.Engine:
    sync_url = sa.make_url(database_url)
    if sync_url.drivername == "sqlite+aiosqlite":
        sync_url = sync_url.set(drivername="sqlite")
    return sa.create_engine(sync_url)


async def test_migrations_match_tables_and_downgrade(database_url: str) -> None:
    await asyncio.to_thread(upgrade, database_url)
    await asyncio.to_thread(upgrade, database_url)  # a second run is a no-op
    engine = _sync_engine(database_url)
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        await asyncio.to_thread(downgrade, database_url, "base")
        with engine.connect() as conn:
            assert set(sa.inspect(conn).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()


async def test_ping_and_unreachable_database(database: Database, tmp_path: Path) -> None:
    await database.ping()
    for url in (
        "postgresql+psycopg://postgres@127.0.0.1:1/nowhere",
        f"sqlite+aiosqlite:///{tmp_path / 'missing-dir' / 'x.db'}",
    ):
        down = Database(url)
        assert down.url == url
        with pytest.raises(StoreUnavailable):
            await down.ping()
        with pytest.raises(StoreUnavailable):
            await down.get_account("a1")
        with pytest.raises(StoreUnavailable):
            await down.write_records([entry("a1"), session("s1", "open", 30, T0), event("a1")])
        await down.close()


async def test_accounts_round_trip_and_conflicts(database: Database) -> None:
    a = agency()
    allowance = entry("a1", free=300_000_000, kind=EntryKind.FREE_ALLOWANCE)
    await database.insert_account(a, [allowance])
    assert await database.get_account("a1") == a
    assert await database.get_ledger_entry(allowance.entry_id) == allowance

    # Agencies and clients share one namespace; a failed insert writes none of its records.
    clash = Account("a1", AccountKind.CLIENT, "a0", plan_id="p", billing_mode=BillingMode.REBILLING)
    stray = entry("a1", free=1)
    with pytest.raises(AlreadyExists):
        await database.insert_account(clash, [stray])
    assert await database.get_ledger_entry(stray.entry_id) is None
    assert await database.wallet_totals() == {("a1", VOICE): (300_000_000, 0)}

    client = Account(
        "c1", AccountKind.CLIENT, "a1", plan_id="basic", billing_mode=BillingMode.AGENCY_PAID, created_at=T0
    )
    await database.insert_account(client)
    changed = dataclasses.replace(a, outbound_active=False, platform_rates=None, settings={}, anchor_day=15)
    await database.update_account(changed)
    assert await database.get_account("a1") == changed
    assert [x.account_id for x in await database.list_accounts()] == ["a1", "c1"]
    assert (await database.list_accounts())[1] == client
    assert await database.get_account("nope") is None
    with pytest.raises(NotFound):
        await database.update_account(dataclasses.replace(client, account_id="nope"))


async def test_plans_round_trip_and_conflicts(database: Database) -> None:
    rates = RateCard(voice={"deepgram": 1_500_000, "voice_clone": 3_000_000}, sms={"GB": 400_000})
    plan = Plan("a1", "basic", 200_000_000, 50_000_000, rates, usage_limit_micros=500_000_000)
    await database.insert_plan(plan)
    await database.insert_plan(Plan("a2", "basic"))  # plan ids are per agency
    with pytest.raises(AlreadyExists):
        await database.insert_plan(Plan("a1", "basic"))
    assert await database.get_plan("a1", "basic") == plan
    stored = await database.get_plan("a1", "basic")
    assert stored is not None and stored.rates.voice_rate("Voice_Clone") == 3_000_000

    updated = dataclasses.replace(plan, max_concurrent_sessions=4, rates=RateCard())
    await database.update_plan(updated)
    assert [(p.agency_id, p.plan_id) for p in await database.list_plans()] == [
        ("a1", "basic"),
        ("a2", "basic"),
    ]
    assert await database.get_plan("a1", "basic") == updated
    assert await database.get_plan("a2", "premium") is None
    with pytest.raises(NotFound):
        await database.update_plan(Plan("a3", "basic"))


async def test_api_keys(database: Database) -> None:
    admin = ApiKey("k1", Role.PLATFORM_ADMIN, "", "00" * 32, "bootstrap", created_at=T0)
    worker = ApiKey("k2", Role.WORKER, "a1", "11" * 32, created_at=T0 + 1)
    reader = ApiKey("k3", Role.READER, "c1", "22" * 32, created_at=T0 + 2)
    for key in (reader, admin, worker):
        await database.insert_api_key(key)
    with pytest.raises(AlreadyExists):
        await database.insert_api_key(admin)
    assert await database.get_api_key("k2") == worker
    assert await database.list_api_keys() == [admin, worker, reader]
    assert await database.list_api_keys("a1") == [worker]

    revoked = await database.revoke_api_key("k2", T0 + 10)
    assert revoked == dataclasses.replace(worker, revoked_at=T0 + 10)
    again = await database.revoke_api_key("k2", T0 + 99)  # keeps the first revocation time
    assert again is not None and again.revoked_at == T0 + 10
    assert await database.revoke_api_key("missing", T0) is None


async def test_topup_is_idempotent_by_key(database: Database) -> None:
    e1, ev1 = topup("a1", "pay-1", 5_000_000)
    assert await database.insert_topup("a1", e1, "fp-a", ev1) == (e1, "fp-a", True)

    e2, ev2 = topup("a1", "pay-1", 9_000_000)  # same key, other parameters
    original, fingerprint, created = await database.insert_topup("a1", e2, "fp-b", ev2)
    assert (original, fingerprint, created) == (e1, "fp-a", False)
    assert await database.get_ledger_entry(e2.entry_id) is None
    events, _ = await database.list_events(["a1"], 10, None)
    assert events == [ev1]
    assert await database.wallet_totals() == {("a1", VOICE): (0, 5_000_000)}

    with pytest.raises(InvalidArgument):
        await database.insert_topup("a1", entry("a1", purchased=1, kind=EntryKind.TOPUP), "fp", event("a1"))


async def test_idempotency_keys_are_per_agency(database: Database) -> None:
    e1, ev1 = topup("c1", "invoice-X", 5_000_000)
    e2, ev2 = topup("b1", "invoice-X", 7_000_000)  # another agency, the same key
    assert await database.insert_topup("a1", e1, "fp-a", ev1) == (e1, "fp-a", True)
    assert await database.insert_topup("b1", e2, "fp-b", ev2) == (e2, "fp-b", True)
    e3, ev3 = topup("a1", "invoice-X", 1_000_000)  # the agency of c1: its keys are c1's
    assert await database.insert_topup("a1", e3, "fp-c", ev3) == (e1, "fp-a", False)
    assert await database.wallet_totals() == {("c1", VOICE): (0, 5_000_000), ("b1", VOICE): (0, 7_000_000)}


async def test_session_ids_are_per_agency(database: Database) -> None:
    mine = session("call-1", "open", 30, T0)
    theirs = session("call-1", "open", 60, T0, agency_id="b1", client_id="d1", reserved={"d1": 1, "b1": 2})
    await database.write_records([mine, theirs])
    await database.write_records([session("call-1", "open", 90, T0 + 1)])  # a renewal of mine only
    assert await database.get_session("b1", "call-1") == theirs
    assert await database.open_sessions() == [session("call-1", "open", 90, T0 + 1), theirs]


async def test_migration_gives_existing_keys_the_agency_of_their_account(database_url: str) -> None:
    await asyncio.to_thread(upgrade, database_url, "0001")
    engine = _sync_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO accounts VALUES ('c1', 2, 'a1', '', 'p', 1, true, true, 1, 0, 0, NULL, '{}', 0)")
            )
            conn.execute(
                sa.text(
                    "INSERT INTO ledger_entries (entry_id, account_id, balance_type, kind, topup_kind, amount_micros,"
                    " free_micros, purchased_micros, usage_micros, seconds, created_at, session_id, message_id,"
                    " idempotency_key, external_ref) VALUES ('e1', 'c1', 1, 1, 1, 5, 0, 5, 0, 0, 0, '', '', 'k1', '')"
                )
            )
            conn.execute(sa.text("INSERT INTO idempotency_keys VALUES ('k1', 'fp', 'e1', 0), ('k2', 'fp', 'gone', 0)"))
        await asyncio.to_thread(upgrade, database_url)
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT agency_id, idempotency_key FROM idempotency_keys ORDER BY 2")).all()
        assert [tuple(r) for r in rows] == [("a1", "k1"), ("", "k2")]
        db = Database(database_url)
        try:  # the key keeps its meaning in its agency
            again, _ = topup("c1", "k1", 5)
            original, fingerprint, created = await db.insert_topup("a1", again, "fp", event("c1"))
            assert (original.entry_id, fingerprint, created) == ("e1", "fp", False)
        finally:
            await db.close()
    finally:
        engine.dispose()


async def test_a_session_says_when_it_was_answered_and_older_rows_are_taken_as_answered(database_url: str) -> None:
    await asyncio.to_thread(upgrade, database_url, "0003")
    engine = _sync_engine(database_url)
    try:
        with engine.begin() as conn:  # an open session written before started_at existed
            conn.execute(
                sa.text(
                    "INSERT INTO sessions (session_id, client_id, agency_id, channel, direction, provider, status,"
                    " granted_seconds, billed_seconds, reserved, charged, updated_at, cutoff_reason)"
                    " VALUES ('old', 'c1', 'a1', 1, 1, '', 'open', 60, 0, '{}', '{}', 1500000, 0)"
                )
            )
        await asyncio.to_thread(upgrade, database_url)
        db = Database(database_url)
        try:
            old = await db.get_session("a1", "old")
            assert old is not None and old.started_at == 1.5  # the rule it was written under: answered
            waiting, answered = session("waiting", "open", 60, T0), session("answered", "open", 60, T0, started_at=T0)
            await db.write_records([waiting, answered])
            assert await db.get_session("a1", "waiting") == waiting and waiting.started_at == 0
            assert await db.get_session("a1", "answered") == answered
        finally:
            await db.close()
    finally:
        engine.dispose()


async def test_concurrent_topups_with_one_key_credit_once(database: Database) -> None:
    attempts = [topup("a1", "pay-race", 1_000_000 * (i + 1)) for i in range(8)]
    results = await asyncio.gather(
        *(database.insert_topup("a1", e, f"fp-{i}", ev) for i, (e, ev) in enumerate(attempts))
    )
    winners = [r for r in results if r[2]]
    assert len(winners) == 1
    won_entry, won_fp, _ = winners[0]
    assert all(r[0] == won_entry and r[1] == won_fp for r in results)
    assert await database.wallet_totals() == {("a1", VOICE): (0, won_entry.purchased_micros)}
    entries, _ = await database.list_ledger("a1", None, 100, None)
    assert entries == [won_entry]


async def test_write_records_batches_are_idempotent(database: Database) -> None:
    batch: list[LedgerRecord | EventRecord | SessionRecord] = []
    for i in range(300):
        account, balance = ("a1", VOICE) if i % 3 else ("c1", SMS)
        batch.append(entry(account, free=-(i % 7), purchased=-(i % 5), usage=i, balance_type=balance))
        if i % 10 == 0:
            batch.append(event(account, EventType.LOW_BALANCE, balance_type=balance, attributes={"i": str(i)}))
    batch.append(session("s1", "open", 30, T0))
    await database.write_records(batch)
    await database.write_records(batch)  # a flusher retrying after a lost ack
    await database.write_records(batch[100:] + batch[:5] + batch[:5])  # overlapping, duplicated

    expected: dict[tuple[str, BalanceType], tuple[int, int]] = {}
    for r in batch:
        if isinstance(r, LedgerRecord):
            free, purchased = expected.get((r.account_id, r.balance_type), (0, 0))
            expected[(r.account_id, r.balance_type)] = (free + r.free_micros, purchased + r.purchased_micros)
    assert await database.wallet_totals() == expected
    assert await database.usage_since("a1", VOICE, T0) == sum(i for i in range(300) if i % 3)
    events, cursor = await database.list_events(["a1", "c1"], 1000, None)
    assert cursor is None
    assert sorted(e.event_id for e in events) == sorted(r.event_id for r in batch if isinstance(r, EventRecord))
    assert {e.attributes["i"] for e in events} == {str(i) for i in range(0, 300, 10)}
    assert await database.open_sessions() == [session("s1", "open", 30, T0)]
    await database.write_records([])


async def test_sessions_never_reopen_once_settled(database: Database) -> None:
    await database.write_records([session("s1", "open", 30, T0), session("s2", "open", 30, T0)])
    await database.write_records([session("s1", "open", 60, T0 + 25)])  # renewal
    got = await database.get_session("a1", "s1")
    assert got is not None and got.granted_seconds == 60 and got.updated_at == T0 + 25

    settled = session(
        "s1", "settled", 60, T0 + 42, billed_seconds=42, reserved={}, charged={"c1": 42_000}, cutoff_reason=3
    )
    await database.write_records([settled])
    await database.write_records([session("s1", "open", 90, T0 + 50)])  # a stale slice arriving late
    assert await database.get_session("a1", "s1") == settled

    # Within one batch too: the settlement wins over slices before and after it.
    s2_settled = session("s2", "settled", 30, T0 + 20, billed_seconds=20, charged={"c1": 20_000})
    await database.write_records([session("s2", "open", 60, T0 + 10), s2_settled, session("s2", "open", 90, T0 + 30)])
    assert await database.get_session("a1", "s2") == s2_settled
    assert await database.open_sessions() == []
    assert await database.get_session("a1", "s3") is None


async def test_a_sessions_newest_state_wins_within_and_across_batches(database: Database) -> None:
    slices = [session("s1", "open", 30 * n, T0 + 25 * n) for n in (1, 2, 3)]
    await database.write_records(slices)  # one batch: only the newest slice is written
    assert await database.get_session("a1", "s1") == slices[2]

    # A batch taken again after a lost ack arrives after the newer state: it changes nothing.
    await database.write_records(slices[:2])
    await database.write_records([slices[1], slices[0]])
    assert await database.get_session("a1", "s1") == slices[2]

    # Replicas' clocks differ: a newer slice stamped earlier still wins, an older one stamped
    # later does not.
    newer_earlier = session("s1", "open", 120, T0)
    await database.write_records([newer_earlier])
    await database.write_records([session("s1", "open", 90, T0 + 500)])
    assert await database.get_session("a1", "s1") == newer_earlier
    assert await database.open_sessions() == [newer_earlier]


def test_a_batch_holds_each_record_once_and_one_state_per_session() -> None:
    e, ev = entry("a1", usage=5), event("a1")
    states = [session("s1", "open", 30, T0), session("s2", "open", 30, T0), session("s1", "open", 60, T0 + 1)]
    batch = RecordBatch.of([e, ev, *states, e, ev, states[0]])
    assert batch.entries == [e] and batch.events == [ev]
    assert batch.sessions == [states[2], states[1]]
    settled = session("s1", "settled", 30, T0 + 2, billed_seconds=20)
    # a stale copy later in the batch (taken again with newer records) loses too
    assert RecordBatch.of([states[2], states[0]]).sessions == [states[2]]
    assert RecordBatch.of([settled, states[2]]).sessions == [settled]
    assert not RecordBatch.of([]) and RecordBatch.of([states[0]])


def test_outbox_rows_name_every_column_and_every_record_field() -> None:
    for columns, table, record in (
        (outbox.ENTRY_COLUMNS, tables.ledger_entries, LedgerRecord),
        (outbox.EVENT_COLUMNS, tables.events, EventRecord),
        (outbox.SESSION_COLUMNS, tables.sessions, SessionRecord),
    ):
        assert set(columns) == {c.name for c in table.c} - {"seq"} == {f.name for f in dataclasses.fields(record)}


async def test_a_second_copy_of_an_entry_or_event_is_ignored(database: Database) -> None:
    first, first_event = entry("a1", free=-100, usage=100), event("a1", amount_micros=7)
    twin = dataclasses.replace(first, free_micros=-999, amount_micros=-999, usage_micros=999)
    twin_event = dataclasses.replace(first_event, amount_micros=8)
    await database.write_records([first, first_event, twin, twin_event])
    await database.write_records([twin, twin_event])
    assert await database.get_ledger_entry(first.entry_id) == first
    assert await database.list_ledger("a1", None, 10, None) == ([first], None)
    assert await database.list_events(["a1"], 10, None) == ([first_event], None)


async def test_a_batch_is_written_whole_or_not_at_all(database: Database) -> None:
    good = [entry("a1", usage=1), session("s1", "open", 30, T0), event("a1")]
    # the last insert of the transaction fails: the rows before it must not stay
    unwritable = event("a1", session_id=None)  # type: ignore[arg-type]
    with pytest.raises((sa.exc.IntegrityError, psycopg.IntegrityError)):
        await database.write_records([*good, unwritable])
    assert await database.list_ledger("a1", None, 10, None) == ([], None)
    assert await database.get_session("a1", "s1") is None
    assert await database.list_events(["a1"], 10, None) == ([], None)
    await database.write_records(good)  # the writer is usable again
    assert await database.get_session("a1", "s1") == good[1]
    assert await database.list_events(["a1"], 10, None) == ([good[2]], None)


postgres_only = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


@postgres_only
async def test_a_cancelled_postgres_write_leaves_all_or_nothing_and_the_next_write_works(database: Database) -> None:
    # A flusher stopped at shutdown is cancelled wherever it is: before connecting, in a
    # COPY, in an insert or at commit. Cancel at a spread of moments; each batch must be
    # all there or not at all, and the write after it must go through. (Postgres only: on
    # SQLite a write cancelled inside SQLAlchemy/aiosqlite leaves its transaction open.)
    for delay in (0.0, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032):
        batch = [entry("a1", usage=1) for _ in range(400)]
        task = asyncio.create_task(database.write_records(batch))
        await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        written = {e.entry_id for e in (await database.list_ledger("a1", None, 10_000, None))[0]}
        assert {e.entry_id for e in batch} & written in (set(), {e.entry_id for e in batch})
        after = entry("a1", usage=1)
        await database.write_records([after])
        assert await database.get_ledger_entry(after.entry_id) == after


@postgres_only
async def test_the_postgres_writer_reconnects_after_losing_its_connection(database: Database) -> None:
    await database.write_records([entry("a1", usage=1)])
    name = sa.make_url(database.url).database
    with psycopg.connect(services.POSTGRES_ADMIN_URL, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        ).fetchall()
    assert killed  # the writer's connection (and the pool's) are gone
    lost = entry("a1", usage=2)
    with pytest.raises(StoreUnavailable):
        await database.write_records([lost])
    assert await database.get_ledger_entry(lost.entry_id) is None
    await database.write_records([lost])  # a new connection
    assert await database.usage_since("a1", VOICE, T0) == 3


async def test_ledger_pages_newest_first(database: Database) -> None:
    written = [entry("a1", usage=i, balance_type=SMS if i % 2 else VOICE, created_at=T0 + i) for i in range(7)]
    await database.write_records([*written, entry("other", usage=99)])

    pages: list[list[LedgerRecord]] = []
    cursor: str | None = None
    while True:
        page, cursor = await database.list_ledger("a1", None, 3, cursor)
        pages.append(page)
        if cursor is None:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [e for p in pages for e in p] == written[::-1]

    page, cursor = await database.list_ledger("a1", SMS, 3, None)
    assert [e.usage_micros for e in page] == [5, 3, 1] and cursor is None  # exactly one full page: no next
    page, cursor = await database.list_ledger("a1", VOICE, 2, None)
    assert [e.usage_micros for e in page] == [6, 4] and cursor is not None
    page, cursor = await database.list_ledger("a1", VOICE, 2, cursor)
    assert [e.usage_micros for e in page] == [2, 0] and cursor is None
    assert await database.list_ledger("nobody", None, 5, None) == ([], None)
    for bad_cursor in ("abc", "-4"):
        with pytest.raises(InvalidArgument):
            await database.list_ledger("a1", None, 3, bad_cursor)
    with pytest.raises(InvalidArgument):
        await database.list_ledger("a1", None, 0, None)


async def test_events_paging_and_polling(database: Database) -> None:
    assert await database.events_after(["a1"], -1) == ([], 0)
    first = [event("a1" if i % 2 else "c1", created_at=T0 + i) for i in range(5)]
    await database.write_records([*first, event("elsewhere")])

    page, cursor = await database.list_events(["a1", "c1"], 2, None)
    assert page == first[:-3:-1] and cursor is not None
    page, cursor = await database.list_events(["a1", "c1"], 2, cursor)
    rest, end = await database.list_events(["a1", "c1"], 2, cursor)
    assert page + rest == first[2::-1] and end is None
    assert await database.list_events(["a1"], 10, None) == ([first[3], first[1]], None)
    assert await database.list_events([], 10, None) == ([], None)

    _, mark = await database.events_after(["a1", "c1"], -1)
    assert mark > 0
    assert await database.events_after(["a1", "c1"], mark) == ([], mark)
    later = [event("c1", EventType.CUTOFF, session_id="s9"), event("elsewhere"), event("a1", reason=3)]
    await database.write_records(later)
    seen, new_mark = await database.events_after(["a1", "c1"], mark)
    assert seen == [later[0], later[2]] and new_mark > mark
    assert await database.events_after(["a1", "c1"], new_mark) == ([], new_mark)
    everything, _ = await database.events_after(["a1", "c1"], 0)
    assert everything == [*first, later[0], later[2]]
    capped, capped_mark = await database.events_after(["a1", "c1"], 0, limit=2)
    assert capped == first[:2] and capped_mark < new_mark


async def test_queries_that_rebuild_hot_state(database: Database) -> None:
    since = T0 + 100
    await database.write_records(
        [
            entry("a1", free=-10, usage=10, created_at=since - 0.25),  # before the period
            entry("a1", free=-20, usage=20, created_at=since),  # at its start: counts
            entry("a1", purchased=-40, usage=40, created_at=since + 5),
            sms("a1", "m1", since),
            sms("c1", "m1", since),  # one message, two payers
            sms("c1", "m2", since + 1),
            sms("c1", "m0", T0),
            entry("a1", free=300, kind=EntryKind.FREE_ALLOWANCE, created_at=since),
            event("a1", EventType.REFILL_REQUESTED, created_at=since - 1),
            event("a1", EventType.REFILL_REQUESTED, created_at=since),
            event("a1", EventType.REFILL_REQUESTED, created_at=since + 3),
            event("a1", EventType.REFILL_REQUESTED, balance_type=SMS, created_at=since + 3),
            event("a1", EventType.LOW_BALANCE, created_at=since + 3),
            session("s-open", "open", 30, since),
            session("s-done", "settled", 30, since),
        ]
    )
    assert await database.usage_since("a1", VOICE, since) == 60
    assert await database.usage_since("a1", SMS, since) == 80
    assert await database.usage_since("c1", VOICE, since) == 0
    assert await database.count_events_since("a1", VOICE, EventType.REFILL_REQUESTED, since) == 2
    assert await database.count_events_since("a1", SMS, EventType.REFILL_REQUESTED, since) == 1
    assert await database.count_events_since("c1", VOICE, EventType.REFILL_REQUESTED, since) == 0
    assert await database.sms_message_ids(since) == {"m1", "m2"}
    assert await database.sms_message_ids(T0) == {"m0", "m1", "m2"}
    assert [s.session_id for s in await database.open_sessions()] == ["s-open"]
    totals = await database.wallet_totals()
    assert totals[("a1", VOICE)] == (270, -40) and totals[("c1", SMS)] == (0, 0)
