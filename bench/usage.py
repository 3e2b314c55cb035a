"""GetUsage at a million ledger entries on Postgres: the daily rollup against reading the entries.

    python bench/usage.py                        # 1,000,000 entries, 200 clients, 30 days
    python bench/usage.py --entries 100000 --repeat 5

Writes the entries through Database.write_records (the write-behind path, which keeps the
rollup) into a new database, then times the queries GetUsage makes for a month of the
agency grouped by client, of one client grouped by provider and country, and of one client
by day; and, for comparison, the same sums read from the ledger through its
(account, balance type, time) index, which is what an index alone would give. The two must
agree to the micro-credit; the script stops if they do not.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_stores, machine, percentile

from creditd.db import Database
from creditd.domain.records import BalanceType, EntryKind, LedgerRecord, new_id
from creditd.domain.usage import UsageGroup, UsageTotals

MONTH_START = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
MONTH_END = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
PROVIDERS = ["deepgram", "cartesia", "elevenlabs", "voice_clone"]
COUNTRIES = ["US", "CA", "GB", "DE", "FR"]


def usage_pair(rng: random.Random, agency: str, client: str, at: float) -> list[LedgerRecord]:
    """One call or SMS: the client's entry at its plan's price and the agency's at the platform's."""
    voice = rng.random() < 0.7
    session = new_id()
    quantity = rng.randrange(5, 900) if voice else rng.randrange(1, 4)
    common: dict[str, Any] = {
        "balance_type": BalanceType.VOICE if voice else BalanceType.SMS,
        "kind": EntryKind.VOICE_USAGE if voice else EntryKind.SMS_USAGE,
        "created_at": at,
        "session_id": session,
        "message_id": "" if voice else new_id(),
        "seconds": quantity,
        "client_id": client,
        "provider": rng.choice(PROVIDERS) if voice else "",
        "destination_country": "" if voice else rng.choice(COUNTRIES),
    }
    entries = []
    for account, price in ((client, 2_000_000), (agency, 1_000_000)):
        cost = -(-price * quantity // 60) if voice else 166_000 * quantity
        free = rng.randrange(0, cost + 1) if rng.random() < 0.3 else 0
        entries.append(
            LedgerRecord(
                entry_id=new_id(),
                account_id=account,
                amount_micros=-cost,
                free_micros=-free,
                purchased_micros=-(cost - free),
                usage_micros=cost,
                **common,
            )
        )
    return entries


async def fill(db: Database, entries: int, clients: list[str], batch: int) -> float:
    rng = random.Random(1)
    written, started = 0, time.perf_counter()
    step = (MONTH_END - MONTH_START) / (entries / 2)  # in time order, as the write-behind writes them
    while written < entries:
        records: list[LedgerRecord] = []
        while len(records) < batch:
            at = MONTH_START + (written + len(records)) / 2 * step
            records += usage_pair(rng, "agency", rng.choice(clients), at)
        await db.write_records(records)
        written += len(records)
        if written % 100_000 < batch:
            print(f"  {written:,} entries written", file=sys.stderr, flush=True)
    return time.perf_counter() - started


async def timed(repeat: int, run: Callable[[], Awaitable[Any]]) -> tuple[list[float], Any]:
    result, times = None, []
    for _ in range(repeat):
        started = time.perf_counter()
        result = await run()
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times), result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--batch", type=int, default=2000, help="entries per write_records call")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    clients = [f"client-{n:04d}" for n in range(args.clients)]
    both = [BalanceType.VOICE, BalanceType.SMS]
    # The month, with the range's ends inside days so that both paths of the rollup query run.
    since, until = round((MONTH_START + 3600) * 1e6), round((MONTH_END - 3600) * 1e6)
    queries = {
        "agency, month, by client": ("agency", [UsageGroup.CLIENT]),
        "client, month, by channel+provider+country": (
            clients[0],
            [UsageGroup.CHANNEL, UsageGroup.PROVIDER, UsageGroup.DESTINATION_COUNTRY],
        ),
        "client, month, by day": (clients[0], [UsageGroup.DAY]),
    }
    print(machine())
    with bench_stores() as stores:
        db = Database(stores.database_url)
        try:
            seconds = await fill(db, args.entries, clients, args.batch)
            print(f"wrote {args.entries:,} entries in {seconds:.1f} s ({args.entries / seconds:,.0f} entries/s)")
            rollup_rows = await db_count(db, "usage_daily")
            print(f"rollup rows: {rollup_rows:,}")
            print("\n| query | rows | rollup p50 ms | rollup max ms | ledger p50 ms | ledger max ms |")
            print("|---|---|---|---|---|---|")
            for label, (account, groups) in queries.items():
                fast, got = await timed(args.repeat, lambda a=account, g=groups: db.usage(a, both, since, until, g))
                slow, want = await timed(
                    max(3, args.repeat // 4), lambda a=account, g=groups: ledger(db, a, since, until, g)
                )
                if got != want:
                    raise SystemExit(f"{label}: the rollup and the ledger disagree")
                print(
                    f"| {label} | {len(got)} | {percentile(fast, 0.5):.1f} | {fast[-1]:.1f} "
                    f"| {percentile(slow, 0.5):.1f} | {slow[-1]:.1f} |"
                )
        finally:
            await db.close()


async def db_count(db: Database, table: str) -> int:
    import sqlalchemy as sa

    async with db._tx() as conn:
        return int(await conn.scalar(sa.text(f"SELECT count(*) FROM {table}")) or 0)


async def ledger(
    db: Database, account: str, since: int, until: int, groups: list[UsageGroup]
) -> dict[tuple[object, ...], UsageTotals]:
    """The same sums read from the entries of the range only (what an index alone gives)."""
    query = db._ledger_usage_query(account, [1, 2], since, until, groups)
    totals: dict[tuple[object, ...], UsageTotals] = {}
    async with db._tx() as conn:
        for row in (await conn.execute(query)).all():
            totals[tuple(row[: len(groups)])] = UsageTotals(*(int(v or 0) for v in row[len(groups) :]))
    return totals


if __name__ == "__main__":
    asyncio.run(main())
