"""The daily usage rollup against SQLite and Postgres: its sums equal the ledger's, whatever the range."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import sqlalchemy as sa

from creditd.db import Database
from creditd.db import tables as t
from creditd.db.migrate import downgrade, upgrade
from creditd.domain.records import BalanceType, EntryKind, LedgerRecord, TopupKind, new_id
from creditd.domain.usage import DAY_SECONDS, UsageGroup, UsageTotals, day_of, usage_of
from tests.db.test_database import SMS, VOICE, entry

DAY = DAY_SECONDS
START = 20_000 * DAY  # midnight UTC, 2024-10-04
US = 1_000_000


def usage_entry(rng: random.Random, account: str, at: float) -> LedgerRecord:
    voice = rng.random() < 0.6
    cost = rng.randrange(0, 5 * US)
    free = rng.randrange(0, cost + 1)
    return entry(
        account,
        free=-free,
        purchased=-(cost - free),
        usage=cost,
        balance_type=VOICE if voice else SMS,
        kind=EntryKind.VOICE_USAGE if voice else EntryKind.SMS_USAGE,
        seconds=rng.randrange(1, 600) if voice else rng.randrange(1, 4),
        created_at=at,
        session_id=new_id(),
        client_id=rng.choice(["c1", "c2", "c3"]),
        provider=rng.choice(["deepgram", "elevenlabs", ""]) if voice else "",
        destination_country="" if voice else rng.choice(["US", "GB"]),
    )


def expected(
    entries: Sequence[LedgerRecord], account: str, since: float, until: float, groups: Sequence[UsageGroup]
) -> dict[tuple[object, ...], UsageTotals]:
    """The sums, straight from the entries."""
    totals: dict[tuple[object, ...], UsageTotals] = {}
    for e in entries:
        found = usage_of(e)
        if found is None or e.account_id != account or not since <= e.created_at < until:
            continue
        key, quantity = found
        values = {
            UsageGroup.CHANNEL: key.balance_type,
            UsageGroup.PROVIDER: key.provider,
            UsageGroup.DESTINATION_COUNTRY: key.destination_country,
            UsageGroup.CLIENT: key.client_id,
            UsageGroup.DAY: key.day,
        }
        totals.setdefault(tuple(values[g] for g in groups), UsageTotals()).add(quantity)
    return totals


async def test_usage_equals_the_ledger_for_any_range_and_grouping(database: Database) -> None:
    rng = random.Random(7)
    # Five days of usage for two accounts, at times that fall on and around midnights.
    times = [START + rng.randrange(0, 5 * DAY * 4) / 4 for _ in range(400)] + [START + DAY, START + 2 * DAY - 0.25]
    entries = [usage_entry(rng, rng.choice(["a1", "c1"]), at) for at in times]
    topup = entry("a1", purchased=50 * US, kind=EntryKind.TOPUP, topup_kind=TopupKind.PURCHASE, created_at=START)
    batches = [entries[i : i + 37] for i in range(0, len(entries), 37)]
    for batch in batches:
        await database.write_records([*batch, topup])
    await database.write_records(batches[0] + batches[3])  # a batch written again is not counted again

    ranges = [(START, START + 5 * DAY), (START + 0.25, START + 3 * DAY + 7.5), (START + DAY + 5, START + DAY + 900)]
    ranges += [(START + rng.randrange(0, 5 * DAY), START + 5 * DAY) for _ in range(3)]
    groupings: list[list[UsageGroup]] = [[], [UsageGroup.CLIENT], [UsageGroup.DAY, UsageGroup.PROVIDER]]
    groupings += [[UsageGroup.CHANNEL, UsageGroup.DESTINATION_COUNTRY, UsageGroup.CLIENT], list(UsageGroup)]
    for since, until in ranges:
        for groups in groupings:
            for kinds in ([VOICE, SMS], [SMS]):
                got = await database.usage("a1", kinds, round(since * US), round(until * US), groups)
                want = expected([e for e in entries if e.balance_type in kinds], "a1", since, until, groups)
                assert got == want, (since, until, groups, kinds)
    total = (await database.usage("a1", [VOICE, SMS], 0, round((START + 6 * DAY) * US), []))[()]
    assert total.charged_micros == -sum(e.amount_micros for e in entries if e.account_id == "a1")
    assert total.charged_micros == total.free_micros + total.purchased_micros


async def test_whole_days_are_read_from_the_rollup(database: Database) -> None:
    """A month is answered from rollup rows: with the rollup's sums changed, the answer changes."""
    first = entry("a1", free=-2 * US, usage=2 * US, seconds=120, created_at=START + 3600, client_id="c1")
    await database.write_records([first])
    month = (round(START * US), round((START + 30 * DAY) * US))
    assert (await database.usage("a1", [VOICE], *month, []))[()].voice_seconds == 120
    async with database._tx() as conn:
        await conn.execute(sa.update(t.usage_daily).values(voice_seconds=t.usage_daily.c.voice_seconds + 1))
    assert (await database.usage("a1", [VOICE], *month, []))[()].voice_seconds == 121
    # ... while a range inside one day reads the entries themselves
    hour = (round(START * US), round((START + 7200) * US))
    assert (await database.usage("a1", [VOICE], *hour, []))[()].voice_seconds == 120
    assert day_of(START + 3600) == START // DAY


async def test_the_migration_fills_the_rollup_from_an_existing_ledger(database_url: str) -> None:
    await asyncio.to_thread(upgrade, database_url)
    await asyncio.to_thread(downgrade, database_url, "0002")
    db = Database(database_url)
    try:
        rows = [
            {"seq": 1, "entry_id": "e1", "kind": int(EntryKind.VOICE_USAGE), "seconds": 90, "free_micros": -US},
            {
                "seq": 2,
                "entry_id": "e2",
                "kind": int(EntryKind.SMS_USAGE),
                "balance_type": int(SMS),
                "seconds": 2,
                "purchased_micros": -3,
            },
            {"seq": 3, "entry_id": "e3", "kind": int(EntryKind.TOPUP), "purchased_micros": 9 * US},
        ]
        common = {
            "account_id": "a1",
            "balance_type": int(BalanceType.VOICE),
            "topup_kind": None,
            "usage_micros": 0,
            "created_at": round((START + 60) * US),
            "session_id": "s1",
            "message_id": "",
            "idempotency_key": "",
            "external_ref": "",
            "free_micros": 0,
            "purchased_micros": 0,
            "seconds": 0,
        }
        old_columns = [c for c in t.ledger_entries.c if c.name not in ("client_id", "provider", "destination_country")]
        old_ledger = sa.Table("ledger_entries", sa.MetaData(), *(sa.Column(c.name, c.type) for c in old_columns))
        async with db._tx() as conn:
            await conn.execute(
                sa.insert(old_ledger),
                [
                    {**common, **r, "amount_micros": r.get("free_micros", 0) + r.get("purchased_micros", 0)}
                    for r in rows
                ],
            )
            await conn.execute(
                sa.text(
                    "INSERT INTO sessions VALUES ('s1', 'c9', 'a1', 1, 1, 'cartesia', 'settled', 90, 90,"
                    " '{}', '{}', 0, 0)"
                )
            )
        await asyncio.to_thread(upgrade, database_url)
        groups = [UsageGroup.CLIENT, UsageGroup.PROVIDER]
        got = await db.usage("a1", [VOICE, SMS], 0, round((START + DAY) * US), groups)
        assert got == {("c9", "cartesia"): UsageTotals(90, 2, 1, US, 3, 0)}
    finally:
        await db.close()
