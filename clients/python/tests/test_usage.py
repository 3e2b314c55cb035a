"""Listing and usage in both clients and in creditctl (clients, plans, usage) against a real server."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import UTC, datetime

import pytest
from conftest import CREDIT, Setup, unique
from test_cli import Ctl, columns, ctl  # noqa: F401 (the ctl fixture)

from creditd_client import Client, aio, format_credits


async def a_month_of_usage(client: aio.Client, setup: Setup) -> None:
    """Two calls (elevenlabs, deepgram) and two SMS (US, GB) of the setup's client."""
    await client.topup(setup.client_id, 50 * CREDIT, unique("pay"))
    await client.topup(setup.client_id, 5 * CREDIT, unique("pay"), balance_type="sms")
    for provider in ("elevenlabs", "deepgram"):
        session = await client.voice_session(unique("call"), setup.client_id, provider=provider)
        await session.answer()
        assert (await session.hang_up(seconds_used=2)).billed_seconds == 2
    sender = await client.sms_sender(setup.client_id)
    for country in ("US", "GB"):
        assert (await sender.send(unique("msg"), country, segments=2)).allowed
    await sender.close()


def this_month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


async def test_both_clients_page_through_clients_and_plans(client: aio.Client, setup: Setup) -> None:
    for name in ("b-client", "a-client"):
        await client.create_client(f"{name}-{setup.agency_id}", setup.agency_id, setup.plan_id)
    await client.create_plan(setup.agency_id, "another")
    found = [a.account_id async for a in client.list_accounts(setup.agency_id, page_size=1)]
    assert found == sorted([setup.client_id, f"a-client-{setup.agency_id}", f"b-client-{setup.agency_id}"])
    assert [p.plan_id async for p in client.list_plans(setup.agency_id, page_size=1)] == ["another", "per-second"]

    def blocking() -> tuple[list[str], list[str]]:
        with Client(client.address, client_key(client)) as sync:
            accounts = [a.account_id for a in sync.list_accounts(setup.agency_id, page_size=2)]
            return accounts, [p.plan_id for p in sync.list_plans(setup.agency_id, page_size=1)]

    assert await asyncio.to_thread(blocking) == (found, ["another", "per-second"])


async def test_both_clients_get_usage_by_provider_and_country(client: aio.Client, setup: Setup) -> None:
    await a_month_of_usage(client, setup)
    rows = await client.get_usage(setup.client_id, group_by=["channel", "provider", "country"])
    got = {(r.channel, r.provider, r.destination_country): (r.voice_seconds, r.sms_segments) for r in rows}
    assert got == {
        (1, "deepgram", ""): (2, 0),
        (1, "elevenlabs", ""): (2, 0),
        (2, "", "GB"): (0, 2),
        (2, "", "US"): (0, 2),
    }
    assert sum(r.charged_micros for r in rows if r.channel == 1) == 4 * CREDIT  # 4 s at one credit a second

    start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)

    def blocking() -> list[int]:
        with Client(client.address, client_key(client)) as sync:
            (total,) = sync.get_usage(setup.agency_id, start=start, balance_type="voice")
            return [total.voice_seconds, total.sms_messages]

    assert await asyncio.to_thread(blocking) == [4, 0]
    with pytest.raises(ValueError, match="aware datetime"):
        await client.get_usage(setup.client_id, start=datetime(2026, 11, 1))
    with pytest.raises(ValueError, match="usage group"):
        await client.get_usage(setup.client_id, group_by=["planet"])


async def test_creditctl_clients_plans_and_a_months_usage_as_table_csv_and_json(
    ctl: Ctl,  # noqa: F811
    client: aio.Client,
    setup: Setup,
) -> None:
    await a_month_of_usage(client, setup)
    header, line = (await ctl.ok("clients", setup.agency_id)).splitlines()
    assert header.split()[:4] == ["ACCOUNT", "KIND", "NAME", "AGENCY"]
    assert line.split()[:6] == [setup.client_id, "client", "-", setup.agency_id, setup.plan_id, "rebilling"]
    plans = await ctl.ok("plans", setup.agency_id)
    assert columns(plans, "PLAN      ") == ["PLAN", "per-second"] and "VOICE/MIN" in plans

    table = await ctl.ok("usage", setup.client_id, "--month", this_month(), "--by", "provider")
    title, body = table.split("\n", 1)
    assert title.startswith(f"{setup.client_id}: usage {this_month()}-01 to ")
    assert columns(body, "PROVIDER  ") == ["PROVIDER", "-", "deepgram", "elevenlabs"]  # SMS have no provider
    assert columns(body, "VOICE SECONDS") == ["VOICE SECONDS", "0", "2", "2"]

    out = await ctl.ok("usage", setup.agency_id, "--month", this_month(), "--by", "client,channel", "--csv")
    lines = list(csv.DictReader(io.StringIO(out)))
    rows = await client.get_usage(setup.agency_id, group_by=["client", "channel"])
    assert [(line["client"], line["channel"], line["charged"], line["free"]) for line in lines] == [
        (
            r.client_id,
            {1: "voice", 2: "sms"}[r.channel],
            format_credits(r.charged_micros),
            format_credits(r.free_micros),
        )
        for r in rows
    ]
    assert list(lines[0]) == [
        "client", "channel", "voice_seconds", "sms_segments", "sms_messages", "charged", "free", "purchased", "usage",
    ]  # fmt: skip

    data = await ctl.json("usage", setup.client_id, "--by", "day")
    assert isinstance(data, list) and len(data) == 1
    assert data[0]["day"] == datetime.now(UTC).strftime("%Y-%m-%d") and data[0]["voice_seconds"] == 4

    empty = await ctl.ok("usage", setup.client_id, "--month", "2020-01")
    assert columns(empty.split("\n", 1)[1], "VOICE SECONDS") == ["VOICE SECONDS", "0"]
    for bad in (["--month", "2026-13"], ["--month", "november"], ["--by", "planet"]):
        code, _, err = await ctl("usage", setup.client_id, *bad)
        assert code == 2 and err


def client_key(client: aio.Client) -> str:
    return dict(client._metadata)["authorization"].removeprefix("Bearer ")
