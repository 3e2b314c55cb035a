"""The write-behind fence: a replica's write-behind that took records from Redis just before
Redis lost its data commits them before another replica's rebuild reads the database, so
the rebuilt balances include them (they would otherwise reach the database behind the
rebuild's back: usage missing from the rebuilt wallets, an open session nothing settles)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

import psycopg

from creditd.config import Settings
from creditd.db import Database
from creditd.domain.records import BalanceType, EntryKind, LedgerRecord, Record, new_id
from creditd.engine.context import Context
from creditd.engine.durability import Flusher, rebuild, reconcile
from creditd.store.bus import LocalBus
from creditd.store.redis import RedisHotStore
from tests import services
from tests.conftest import CREDIT, ServerFactory
from tests.crash.procs import conninfo


def _replica(backend: dict[str, str]) -> Context:
    settings = Settings(**backend)
    store = RedisHotStore(settings.redis_url, settings.redis_prefix)
    return Context(settings, store, Database(settings.database_url), LocalBus())


def _rebuild_waits(database_url: str) -> bool:
    """Whether a session of this database waits for an advisory lock (the rebuild's fence)."""
    with psycopg.connect(conninfo(database_url)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
            " WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()"
        ).fetchone()
    return bool(row and row[0])


async def test_a_rebuild_reads_the_database_after_the_write_behind_batch_taken_before_the_loss(
    make_server: ServerFactory, backend: dict[str, str]
) -> None:
    async with make_server() as server:
        await server.api.agency("a1")
        await server.api.plan("a1", "p", free_voice_micros=0)
        await server.api.client("c1", "a1", "p")
        await server.api.topup("c1", 5 * CREDIT, "t1")
    writer, rebuilder = _replica(backend), _replica(backend)
    taken, go = asyncio.Event(), asyncio.Event()
    flushing: asyncio.Task[int] | None = None
    rebuilding: asyncio.Task[int] | None = None
    try:
        # Usage that Redis held (the wallet already debited there) and that replica 1's
        # write-behind takes just before Redis loses everything.
        now = time.time()
        usage = LedgerRecord(new_id(), "c1", BalanceType.VOICE, EntryKind.VOICE_USAGE, -CREDIT, 0, -CREDIT, CREDIT, now)
        await writer.store.append_records("a1", [usage])
        store = writer.store
        take = store.take_records
        calls = 0

        async def take_and_hold(limit: int) -> Sequence[tuple[str, Record]]:
            nonlocal calls
            calls += 1
            batch = await take(limit)
            if calls == 2:  # the take inside the fence: hold it there, uncommitted
                taken.set()
                await go.wait()
            return batch

        store.take_records = take_and_hold  # type: ignore[method-assign]
        flushing = asyncio.create_task(Flusher(writer).flush())
        await asyncio.wait_for(taken.wait(), 10)
        services.delete_redis_keys(backend["redis_prefix"])  # Redis lost everything
        rebuilding = asyncio.create_task(rebuild(rebuilder))

        deadline = time.monotonic() + 10
        while not await asyncio.to_thread(_rebuild_waits, backend["database_url"]):
            assert not rebuilding.done(), (
                "the rebuild read the database while a batch taken before the loss was uncommitted"
            )
            assert time.monotonic() < deadline, "the rebuild never waited for the write-behind"
            await asyncio.sleep(0.02)
        go.set()
        assert await flushing == 1
        await rebuilding
        wallet = await rebuilder.store.read_wallet("a1", "c1", BalanceType.VOICE, time.time())
        assert wallet is not None and wallet.purchased_micros == 4 * CREDIT  # the usage is in the rebuilt wallet
        assert await reconcile(rebuilder) == []
    finally:
        go.set()  # whatever failed, the held write-behind lets go of its connection
        for task in (flushing, rebuilding):
            if task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 10)
        for ctx in (writer, rebuilder):
            await ctx.store.close()
            await ctx.db.close()
