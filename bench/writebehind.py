"""The write-behind's cost per record on the machine's Postgres, by write path.

Writes the same mix of outbox records, in batches of the flusher's size, through:

* `sqlalchemy`: the SQLAlchemy Core path (executemany of the upserts; what SQLite uses,
  and what Postgres used before the psycopg writer);
* `copy`: creditd's Postgres path (creditd.db.postgres_writer: COPY into staging tables,
  one INSERT … SELECT … ON CONFLICT per table);
* `pipeline`: for comparison only, the same conflict statements sent row by row with
  psycopg's executemany, which runs in pipeline mode.

The mix is what calls leave in the outbox: per call two slices (open session states), a
settlement (the settled state, a ledger entry per payer) and a cutoff event, interleaved
over many calls so a batch holds several states of some sessions. Each path writes into a
new database of its own, one batch at a time, as the flusher does. Reported per path:
wall time and this process's CPU time per record (the CPU is what the event loop spends),
the slowest batch, and the longest stretch of CPU work between two turns of the event loop
(what a write holds the loop for; a task waking every millisecond measures it). Rounds
alternate the order of the paths.

    python bench/writebehind.py                            # 20,000 records, batches of 200, 3 rounds
    python bench/writebehind.py --records 50000 --rounds 5

Needs the machine's Postgres (CREDITD_BENCH_POSTGRES_ADMIN_URL).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import psycopg
import sqlalchemy as sa
from common import bench_stores, machine
from sqlalchemy.dialects import postgresql

from creditd.db import Database, outbox
from creditd.db import tables as t
from creditd.db.outbox import RecordBatch
from creditd.db.postgres_writer import conninfo
from creditd.domain.records import (
    BalanceType,
    EntryKind,
    EventRecord,
    EventType,
    LedgerRecord,
    Record,
    SessionRecord,
    new_id,
)

T0 = 1_760_000_000.0
CONCURRENT_CALLS = 200  # calls whose records interleave in the outbox


def call_records(n: int) -> list[list[Record]]:
    """The outbox records of call n, in the order the call produces them."""
    sid, client, agency = f"call-{n}-{new_id()[:8]}", f"c{n % 50}", "a1"
    voice = BalanceType.VOICE

    def state(status: str, granted: int, at: float, billed: int = 0, charged: int = 0) -> SessionRecord:
        reserved = {client: granted * 16_667, agency: granted * 16_667} if status == "open" else {}
        paid = {client: charged, agency: charged} if charged else {}
        return SessionRecord(sid, client, agency, 1, 1, "deepgram", status, granted, billed, reserved, paid, at)

    def usage(account: str, at: float) -> LedgerRecord:
        return LedgerRecord(
            new_id(), account, voice, EntryKind.VOICE_USAGE, -1_500_000, -1_000_000, -500_000, 1_500_000, at,
            session_id=sid, seconds=90,
        )  # fmt: skip

    at = T0 + n
    settled = state("settled", 120, at + 90, billed=90, charged=1_500_000)
    cutoff = EventRecord(new_id(), client, EventType.CUTOFF, voice, at + 90, session_id=sid, attributes={"b": "90"})
    # each inner list leaves the store in one step
    return [
        [state("open", 60, at)],
        [state("open", 120, at + 45)],
        [usage(client, at + 90), usage(agency, at + 90), settled, cutoff],
    ]


def outbox_order(count: int) -> list[Record]:
    """About `count` records of calls that overlap in time, in outbox order."""
    records: list[Record] = []
    calls = 0
    while len(records) < count:
        wave = [call_records(calls + i) for i in range(CONCURRENT_CALLS)]
        calls += CONCURRENT_CALLS
        for step in range(3):
            for steps in wave:
                records.extend(steps[step])
    return records[:count]


Writer = Callable[[list[Record]], Awaitable[None]]


async def run_path(name: str, url: str, records: list[Record], batch: int) -> dict[str, float]:
    db = Database(url)
    writer: Writer
    conn: psycopg.AsyncConnection[Any] | None = None
    if name == "copy":
        writer = db.write_records
    elif name == "sqlalchemy":

        async def writer(chunk: list[Record]) -> None:
            async with db._tx() as sa_conn:  # the SQLAlchemy path that SQLite takes
                await db._write(sa_conn, RecordBatch.of(chunk))

    else:
        conn = await psycopg.AsyncConnection.connect(conninfo(url), autocommit=True)
        writer = pipeline_writer(conn)
    try:
        await writer(records[:batch])  # connect and warm up outside the measurement
        rest = records[batch:]
        slowest = 0.0
        stall = [0.0]
        ticker = asyncio.create_task(watch_loop(stall))
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(rest), batch):
            began = time.perf_counter()
            await writer(rest[start : start + batch])
            slowest = max(slowest, time.perf_counter() - began)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        ticker.cancel()
    finally:
        if conn is not None:
            await conn.close()
        await db.close()
    return {
        "wall_us": wall / len(rest) * 1e6,
        "cpu_us": cpu / len(rest) * 1e6,
        "slowest_ms": slowest * 1e3,
        "stall_ms": stall[0] * 1e3,
    }


async def watch_loop(longest: list[float]) -> None:
    """Record in longest[0] the most CPU time this thread spent between two wake-ups of a
    task that sleeps 1 ms: about how long a write held the event loop (CPU time, so that
    the process being descheduled on a busy machine does not count). Its own wake-ups
    cost about 1% of a core, included in the CPU figures."""
    last = time.thread_time()
    while True:
        await asyncio.sleep(0.001)
        now = time.thread_time()
        longest[0] = max(longest[0], now - last)
        last = now


def pipeline_writer(conn: psycopg.AsyncConnection[Any]) -> Writer:
    def compiled(
        table: sa.Table, columns: tuple[str, ...], conflict: Callable[[Any], Any]
    ) -> tuple[str, dict[str, Any]]:
        """The statement with one row's parameters, and its constant parameters (the rule's
        'settled')."""
        insert = postgresql.insert(table).values({c: sa.bindparam(c) for c in columns})
        compiled = conflict(insert).compile(dialect=postgresql.psycopg.dialect())  # type: ignore[no-untyped-call]
        return str(compiled), {k: b.value for k, b in compiled.binds.items() if k not in columns}

    entries = compiled(t.ledger_entries, outbox.ENTRY_COLUMNS, outbox.entry_insert)
    sessions = compiled(t.sessions, outbox.SESSION_COLUMNS, outbox.session_upsert)
    events = compiled(t.events, outbox.EVENT_COLUMNS, outbox.event_insert)
    json = psycopg.types.json.Json

    async def write(chunk: list[Record]) -> None:
        b = RecordBatch.of(chunk)
        async with conn.transaction(), conn.cursor() as cursor:
            if b.entries:
                await cursor.executemany(entries[0], [outbox.entry_row(e) for e in b.entries])
            if b.sessions:
                rows = [
                    {**sessions[1], **outbox.session_row(s), "reserved": json(s.reserved), "charged": json(s.charged)}
                    for s in b.sessions
                ]
                await cursor.executemany(sessions[0], rows)
            if b.events:
                await cursor.execute("SELECT pg_advisory_xact_lock(%s)", (outbox.EVENTS_LOCK,))
                rows = [{**outbox.event_row(e), "attributes": json(e.attributes)} for e in b.events]
                await cursor.executemany(events[0], rows)

    return write


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=200, help="records per transaction (CREDITD_FLUSH_BATCH)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--paths", default="sqlalchemy,copy,pipeline")
    args = parser.parse_args()
    paths = args.paths.split(",")
    records = outbox_order(args.records + args.batch)
    kinds = {k: sum(type(r).__name__ == k for r in records) for k in ("LedgerRecord", "EventRecord", "SessionRecord")}
    print(machine())
    print(f"{args.records} records (+1 warm-up batch) of {kinds}, batches of {args.batch}")
    results: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
    for round_ in range(args.rounds):
        order = paths if round_ % 2 == 0 else paths[::-1]
        for name in order:
            with bench_stores() as stores:
                result = await run_path(name, stores.database_url, records, args.batch)
            results[name].append(result)
            print(
                f"round {round_ + 1} {name:>10}: {result['wall_us']:6.1f} µs/record wall, "
                f"{result['cpu_us']:6.1f} µs/record CPU, slowest batch {result['slowest_ms']:.1f} ms, "
                f"longest loop hold {result['stall_ms']:.1f} ms",
                flush=True,
            )
    print()
    print("| path | µs/record wall | µs/record CPU (this process) | slowest batch ms | longest loop hold ms (CPU) |")
    print("|---|---|---|---|---|")
    for name in paths:
        rs = results[name]

        def span(key: str, rs: list[dict[str, float]] = rs) -> str:
            values = [r[key] for r in rs]
            return f"{min(values):.1f} to {max(values):.1f} (median {statistics.median(values):.1f})"

        print(f"| {name} | {span('wall_us')} | {span('cpu_us')} | {span('slowest_ms')} | {span('stall_ms')} |")


if __name__ == "__main__":
    asyncio.run(main())
