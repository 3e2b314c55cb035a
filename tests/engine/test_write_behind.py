"""The flusher against real stores: nothing leaves the outbox before the database holds it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from creditd.config import Settings
from creditd.db import Database
from creditd.db.migrate import upgrade
from creditd.domain.records import BalanceType, EntryKind, EventRecord, EventType, LedgerRecord, SessionRecord, new_id
from creditd.engine.context import Context
from creditd.engine.durability import Flusher
from creditd.errors import StoreUnavailable
from creditd.store.base import HotStore
from creditd.store.bus import LocalBus
from creditd.store.embedded import EmbeddedHotStore
from creditd.store.redis import RedisHotStore
from tests import services


@pytest.fixture(params=["embedded", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[HotStore]:
    if request.param == "embedded":
        yield EmbeddedHotStore()
        return
    prefix = services.new_redis_prefix()
    redis_store = RedisHotStore(services.REDIS_URL, prefix)
    try:
        yield redis_store
    finally:
        await redis_store.close()
        services.delete_redis_keys(prefix)


@pytest.fixture(params=["sqlite", "postgres"])
def database_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(a URL of a database that cannot be reached, one of a migrated database)."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'creditd.db'}"
        upgrade(url)
        yield f"sqlite+aiosqlite:///{tmp_path / 'missing-dir' / 'creditd.db'}", url
        return
    name = services.create_database(request.getfixturevalue("postgres_template"))
    try:
        yield "postgresql+psycopg://postgres@127.0.0.1:1/nowhere", services.postgres_url(name)
    finally:
        services.drop_database(name)


def _records(created_at: float, granted: int = 60) -> list[LedgerRecord | EventRecord | SessionRecord]:
    voice = BalanceType.VOICE
    return [
        LedgerRecord(new_id(), "c1", voice, EntryKind.VOICE_USAGE, -500, -500, 0, 500, created_at, session_id="s1"),
        SessionRecord("s1", "c1", "a1", 1, 1, "deepgram", "open", granted, 0, {"c1": granted}, {}, created_at + 1),
        EventRecord(new_id(), "c1", EventType.LOW_BALANCE, voice, created_at + 2),
    ]


async def _flusher(store: HotStore, url: str) -> tuple[Flusher, Database]:
    db = Database(url)
    return Flusher(Context(Settings(database_url=url, flush_batch=2), store, db, LocalBus())), db


async def test_records_stay_in_the_outbox_until_the_database_has_them(
    store: HotStore, database_urls: tuple[str, str]
) -> None:
    unreachable, reachable = database_urls
    written_at = float(int(time.time()) - 5)  # whole seconds: exact in the microsecond columns
    records = _records(written_at)
    await store.append_records("a1", list(records))

    down, down_db = await _flusher(store, unreachable)
    try:
        with pytest.raises(StoreUnavailable):
            await down.flush()
    finally:
        await down_db.close()
    assert [record for _, record in await store.take_records(100)] == records
    assert down.lag_seconds() >= 5  # the oldest record waiting, as the lag metric reports it

    up, db = await _flusher(store, reachable)
    try:
        assert await up.flush() == 3  # two batches of at most flush_batch records
        assert await store.take_records(100) == []
        assert up.lag_seconds() == 0
        entries, _ = await db.list_ledger("c1", None, 10, None)
        events, _ = await db.list_events(["c1"], 10, None)
        assert entries == [records[0]] and await db.get_session("a1", "s1") == records[1] and events == [records[2]]
    finally:
        await db.close()


async def test_concurrent_flushes_of_one_outbox_write_each_record_once(
    store: HotStore, database_urls: tuple[str, str]
) -> None:
    _, reachable = database_urls
    records = [r for i in range(50) for r in _records(float(int(time.time()) + i), granted=60 * (i + 1))]
    await store.append_records("a1", records)
    flushers = [await _flusher(store, reachable) for _ in range(2)]  # two replicas draining
    # and, on one of them, a rebuild's or reconcile's flush beside the background one
    flushers.append((Flusher(flushers[0][0].ctx), flushers[0][1]))
    try:
        await asyncio.gather(*(flusher.flush() for flusher, _ in flushers))
        db = flushers[0][1]
        assert await store.take_records(1000) == []
        entries, _ = await db.list_ledger("c1", None, 1000, None)
        assert sorted(e.entry_id for e in entries) == sorted(r.entry_id for r in records if isinstance(r, LedgerRecord))
        events, _ = await db.list_events(["c1"], 1000, None)
        assert len(events) == 50
        assert await db.get_session("a1", "s1") == records[-2]
    finally:
        for _, db in flushers[:2]:
            await db.close()


async def test_closing_lets_the_flush_in_progress_commit(store: HotStore, database_urls: tuple[str, str]) -> None:
    """A flush cut off midway would leave its transaction to the driver (on SQLite a write
    lock the final flush then waits for): close() lets it finish, then moves the rest."""
    _, reachable = database_urls
    records = _records(float(int(time.time())))
    await store.append_records("a1", list(records))
    flusher, db = await _flusher(store, reachable)
    writing, release = asyncio.Event(), asyncio.Event()
    write_records = db.write_records
    cut_off: list[int] = []

    async def slow_write(batch: list[LedgerRecord | EventRecord | SessionRecord]) -> None:
        writing.set()
        try:
            await release.wait()  # the shutdown arrives while this batch is being written
        except asyncio.CancelledError:
            cut_off.append(len(batch))
            raise
        await write_records(batch)

    db.write_records = slow_write  # type: ignore[method-assign]
    try:
        flusher.start()
        await asyncio.wait_for(writing.wait(), 30)
        closing = asyncio.create_task(flusher.close())
        await asyncio.sleep(0)
        assert not closing.done()
        release.set()
        await asyncio.wait_for(closing, 30)
        assert cut_off == []
        assert await store.take_records(100) == []
        entries, _ = await db.list_ledger("c1", None, 10, None)
        assert entries == [records[0]] and await db.get_session("a1", "s1") == records[1]
    finally:
        await db.close()
