"""ListAccounts, ListPlans and GetUsage over gRPC, on both backends: pages, usage equal to the ledger."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from creditd_client.v1 import account_pb2, common_pb2, ledger_pb2, metering_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from creditd.engine.clock import ManualClock
from tests.conftest import CREDIT, Api, ServerFactory, error_info

VOICE, SMS = common_pb2.BALANCE_TYPE_VOICE, common_pb2.BALANCE_TYPE_SMS
G = ledger_pb2
NOV_3 = datetime(2026, 11, 3, 9, 0, tzinfo=UTC).timestamp()
DAY = 86_400


def stamp(epoch: float) -> Timestamp:
    value = Timestamp()
    value.FromMicroseconds(round(epoch * 1_000_000))
    return value


async def usage(api: Api, account_id: str, *groups: int, **fields: Any) -> list[ledger_pb2.UsageRow]:
    request = ledger_pb2.GetUsageRequest(account_id=account_id, group_by=list(groups), **fields)
    return list((await api.ledger.GetUsage(request, metadata=api.metadata)).rows)


async def ledger(api: Api, account_id: str) -> list[ledger_pb2.LedgerEntry]:
    entries: list[ledger_pb2.LedgerEntry] = []
    token = ""
    while True:
        page = await api.ledger.ListLedgerEntries(
            ledger_pb2.ListLedgerEntriesRequest(account_id=account_id, page_size=50, page_token=token),
            metadata=api.metadata,
        )
        entries += page.entries
        token = page.next_page_token
        if not token:
            return entries


def sums_from_ledger(entries: list[ledger_pb2.LedgerEntry], key: Any) -> dict[Any, tuple[int, ...]]:
    """(voice seconds, SMS segments, messages, charged, free, purchased, usage) per key, from the entries."""
    out: dict[Any, list[int]] = defaultdict(lambda: [0] * 7)
    for e in entries:
        if e.kind not in (ledger_pb2.LEDGER_ENTRY_KIND_VOICE_USAGE, ledger_pb2.LEDGER_ENTRY_KIND_SMS_USAGE):
            continue
        voice = e.kind == ledger_pb2.LEDGER_ENTRY_KIND_VOICE_USAGE
        row = out[key(e)]
        for i, value in enumerate(
            (
                e.seconds if voice else 0,
                0 if voice else e.segments,
                0 if voice else 1,
                -e.amount_micros,
                -e.free_micros,
                -e.purchased_micros,
                e.usage_micros,
            )
        ):
            row[i] += value
    return {k: tuple(v) for k, v in out.items()}


def sums_of(rows: list[ledger_pb2.UsageRow], key: Any) -> dict[Any, tuple[int, ...]]:
    return {
        key(r): (
            r.voice_seconds,
            r.sms_segments,
            r.sms_messages,
            r.charged_micros,
            r.free_micros,
            r.purchased_micros,
            r.usage_micros,
        )
        for r in rows
    }


async def call(api: Api, session_id: str, client_id: str, provider: str, seconds: int) -> None:
    assert (await api.authorize(session_id, client_id, provider=provider)).allowed
    stream, _ = await api.start_call(session_id, client_id)
    assert (await api.end_call(stream, seconds)).summary.billed_seconds == seconds


async def texts(api: Api, client_id: str, session_id: str, sends: list[tuple[str, int]]) -> None:
    stream = api.stream()
    start = metering_pb2.SessionStart(session_id=session_id, client_id=client_id, channel=common_pb2.CHANNEL_SMS)
    await stream.write(metering_pb2.StreamUsageRequest(start=start))
    for number, (country, segments) in enumerate(sends):
        send = metering_pb2.SmsSend(message_id=f"{session_id}-{number}", destination_country=country, segments=segments)
        await stream.write(metering_pb2.StreamUsageRequest(sms=send))
        assert (await stream.read()).sms_result.allowed
    await stream.write(metering_pb2.StreamUsageRequest(end=metering_pb2.SessionEnd()))
    while (await stream.read()).WhichOneof("msg") != "summary":
        pass


async def test_an_agencys_month_by_client_provider_country_and_day_equals_its_ledger(
    make_server: ServerFactory,
) -> None:
    clock = ManualClock(NOV_3)
    async with make_server(clock=clock, slice_seconds=300) as running:
        api = running.api
        await api.agency("acme", voice_rates={"elevenlabs": 2 * CREDIT}, sms_rates={"GB": 400_000})
        await api.plan(
            "acme",
            "gold",
            free_voice_micros=2 * CREDIT,  # two free minutes, then purchased credits
            free_sms_micros=500_000,
            voice_rates={"elevenlabs": 3 * CREDIT},
            sms_rates={"GB": 900_000},
        )
        await api.client("dental", "acme", "gold")
        await api.client("plumber", "acme", "gold", mode=common_pb2.BILLING_MODE_AGENCY_PAID)
        await api.topup("dental", 100 * CREDIT, "pay-1")
        await api.topup("dental", 10 * CREDIT, "pay-2", balance_type=SMS)

        await call(api, "d-1", "dental", "elevenlabs", 61)
        await call(api, "d-2", "dental", "deepgram", 7)
        await call(api, "p-1", "plumber", "", 30)
        await texts(api, "dental", "d-sms", [("US", 1), ("GB", 3), ("GB", 1)])
        await clock.jump(2 * DAY)  # two days later
        await call(api, "d-3", "dental", "elevenlabs", 120)
        await texts(api, "plumber", "p-sms", [("US", 2)])
        await clock.advance(1)  # the default range ends now, and excludes its end

        month = {"start_time": stamp(datetime(2026, 11, 1, tzinfo=UTC).timestamp())}
        month["end_time"] = stamp(datetime(2026, 12, 1, tzinfo=UTC).timestamp())

        # The agency, by client: what it paid the platform for each client's usage.
        rows = await usage(api, "acme", G.USAGE_GROUP_CLIENT, **month)
        assert [r.client_id for r in rows] == ["dental", "plumber"]
        agency_entries = await ledger(api, "acme")
        assert sums_of(rows, lambda r: r.client_id) == sums_from_ledger(agency_entries, lambda e: e.client_id)
        assert rows[0].voice_seconds == 61 + 7 + 120 and rows[0].sms_messages == 3 and rows[0].sms_segments == 5
        for r in rows:
            assert r.charged_micros == r.free_micros + r.purchased_micros > 0

        # The client, by channel, provider and country, and by day.
        entries = await ledger(api, "dental")
        by = (G.USAGE_GROUP_CHANNEL, G.USAGE_GROUP_PROVIDER, G.USAGE_GROUP_DESTINATION_COUNTRY)
        rows = await usage(api, "dental", *by, **month)
        got = sums_of(rows, lambda r: (r.channel, r.provider, r.destination_country))
        assert got == sums_from_ledger(entries, lambda e: (e.balance_type, e.provider, e.destination_country))
        assert set(got) == {(1, "elevenlabs", ""), (1, "deepgram", ""), (2, "", "US"), (2, "", "GB")}
        voice = {r.provider: r for r in rows if r.channel == common_pb2.CHANNEL_VOICE}
        assert voice["elevenlabs"].voice_seconds == 181 and voice["elevenlabs"].charged_micros == 9_050_000
        # 61 s at 3 credits a minute came first: its 3.05 credits took the 2 free ones, then purchased
        total_free = sum(r.free_micros for r in rows if r.channel == common_pb2.CHANNEL_VOICE)
        assert total_free == 2 * CREDIT
        day = lambda e: datetime.fromtimestamp(e.created_at.seconds, UTC).strftime("%Y-%m-%d")  # noqa: E731
        rows = await usage(api, "dental", G.USAGE_GROUP_DAY, **month)
        assert [r.day for r in rows] == ["2026-11-03", "2026-11-05"]
        assert sums_of(rows, lambda r: r.day) == sums_from_ledger(entries, day)

        # A client without a wallet pays nothing itself; its usage at plan prices is what counts.
        (plumber,) = await usage(api, "plumber", **month)
        assert (plumber.charged_micros, plumber.voice_seconds, plumber.sms_segments) == (0, 30, 2)
        assert plumber.usage_micros == 30 * CREDIT // 60 + 2 * 166_000

        # One balance, a range that ends before the second day, and the default range.
        (sms_only,) = await usage(api, "dental", balance_type=SMS)
        assert (sms_only.voice_seconds, sms_only.sms_messages) == (0, 3)
        (first_day,) = await usage(api, "dental", start_time=month["start_time"], end_time=stamp(NOV_3 + DAY))
        assert first_day.voice_seconds == 68
        (everything,) = await usage(api, "dental")
        assert everything.voice_seconds == 188
        (nothing,) = await usage(api, "dental", start_time=stamp(NOV_3 - 3600), end_time=stamp(NOV_3 - 60))
        assert nothing == ledger_pb2.UsageRow()


async def test_clients_and_plans_are_listed_a_page_at_a_time(api: Api) -> None:
    for agency in ("a1", "a2"):
        await api.agency(agency)
    for plan in ("p3", "p1", "p2"):
        await api.plan("a1", plan)
    clients = [f"c{i}" for i in range(5)]
    for client in reversed(clients):
        await api.client(client, "a1", "p1")
    await api.plan("a2", "p9")
    await api.client("other", "a2", "p9")

    async def pages(method: Any, request_type: Any, field: str, **fields: Any) -> list[list[str]]:
        found, token = [], ""
        while True:
            page = await method(request_type(page_size=2, page_token=token, **fields), metadata=api.metadata)
            found.append([getattr(item, field) for item in getattr(page, "accounts", None) or page.plans])
            token = page.next_page_token
            if not token:
                return found

    listing = await pages(api.accounts.ListAccounts, account_pb2.ListAccountsRequest, "account_id", agency_id="a1")
    assert listing == [["c0", "c1"], ["c2", "c3"], ["c4"]]
    assert await pages(api.accounts.ListAccounts, account_pb2.ListAccountsRequest, "account_id") == [["a1", "a2"]]
    plans = await pages(api.accounts.ListPlans, account_pb2.ListPlansRequest, "plan_id", agency_id="a1")
    assert plans == [["p1", "p2"], ["p3"]]

    key = await api.accounts.CreateApiKey(
        account_pb2.CreateApiKeyRequest(role=account_pb2.ROLE_AGENCY_ADMIN, account_id="a2"), metadata=api.metadata
    )
    own = api.as_key(key.secret)  # no agency named: an agency admin gets its own clients and plans
    response = await own.accounts.ListAccounts(account_pb2.ListAccountsRequest(), metadata=own.metadata)
    assert [a.account_id for a in response.accounts] == ["other"]
    response = await own.accounts.ListPlans(account_pb2.ListPlansRequest(), metadata=own.metadata)
    assert [p.plan_id for p in response.plans] == ["p9"]


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
@pytest.mark.parametrize(
    ("method", "request_", "code", "reason", "field"),
    [
        ("GetUsage", G.GetUsageRequest(account_id="c1", group_by=[9]), "INVALID_ARGUMENT", "INVALID_ARGUMENT",
         "group_by"),
        ("GetUsage", G.GetUsageRequest(account_id="c1", group_by=[4, 4]), "INVALID_ARGUMENT", "INVALID_ARGUMENT",
         "group_by"),
        ("GetUsage", G.GetUsageRequest(account_id="c1", start_time=stamp(NOV_3), end_time=stamp(NOV_3)),
         "INVALID_ARGUMENT", "INVALID_ARGUMENT", "end_time"),
        ("GetUsage", G.GetUsageRequest(account_id="c1", start_time=Timestamp(seconds=10**12)),
         "INVALID_ARGUMENT", "INVALID_ARGUMENT", "start_time.seconds"),
        ("GetUsage", G.GetUsageRequest(account_id="c1", balance_type=7), "INVALID_ARGUMENT", "INVALID_ARGUMENT",
         "balance_type"),
        ("GetUsage", G.GetUsageRequest(account_id=""), "INVALID_ARGUMENT", "INVALID_ARGUMENT", "account_id"),
        ("GetUsage", G.GetUsageRequest(account_id="nobody"), "NOT_FOUND", "ACCOUNT_NOT_FOUND", None),
        ("ListAccounts", account_pb2.ListAccountsRequest(agency_id="a1", page_size=1001), "INVALID_ARGUMENT",
         "INVALID_ARGUMENT", "page_size"),
        ("ListAccounts", account_pb2.ListAccountsRequest(agency_id="a1", page_token="no such:token"),
         "INVALID_ARGUMENT", "INVALID_ARGUMENT", "page_token"),
        ("ListAccounts", account_pb2.ListAccountsRequest(agency_id="c1"), "FAILED_PRECONDITION", "NOT_AN_AGENCY",
         None),
        ("ListAccounts", account_pb2.ListAccountsRequest(agency_id="nobody"), "NOT_FOUND", "ACCOUNT_NOT_FOUND", None),
        ("ListPlans", account_pb2.ListPlansRequest(), "INVALID_ARGUMENT", "INVALID_ARGUMENT", "agency_id"),
        ("ListPlans", account_pb2.ListPlansRequest(agency_id="a1", page_size=-1), "INVALID_ARGUMENT",
         "INVALID_ARGUMENT", "page_size"),
    ],
)  # fmt: skip
async def test_bad_listing_and_usage_requests_name_their_field(
    api: Api, method: str, request_: Any, code: str, reason: str, field: str | None
) -> None:
    await api.agency("a1")
    await api.plan("a1", "p")
    await api.client("c1", "a1", "p")
    before = await api.balance("c1")
    stub = api.ledger if method == "GetUsage" else api.accounts
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(stub, method)(request_, metadata=api.metadata)
    assert raised.value.code() is getattr(grpc.StatusCode, code)
    info = error_info(raised.value)
    assert info.reason == reason
    if field is not None:
        assert info.metadata["field"] == field
    assert await api.balance("c1") == before
