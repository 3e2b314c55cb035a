"""The platform's worked examples (SPEC §2-§3), through the public API."""

from __future__ import annotations

import grpc
import pytest
from creditd_client.v1 import account_pb2, common_pb2, ledger_pb2, metering_pb2
from google.protobuf import field_mask_pb2

from creditd.engine.clock import ManualClock
from tests.conftest import ALL_BACKENDS, CREDIT, Api, Running, error_info

# The rules hold on every backend, the Redis Cluster one included.
pytestmark = pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)

INBOUND = common_pb2.DIRECTION_INBOUND
OUTBOUND = common_pb2.DIRECTION_OUTBOUND


async def test_300_credits_at_one_credit_a_minute_are_18000_seconds(api: Api) -> None:
    await api.agency("a1")
    await api.plan("a1", "p", free_voice_micros=1000 * CREDIT)
    await api.client("c1", "a1", "p")
    response = await api.authorize("s1", "c1")
    assert response.allowed
    assert response.max_seconds == 18_000  # the agency's 300 free credits bind


async def test_a_two_second_call_costs_two_seconds_not_a_minute(api: Api) -> None:
    await api.agency("a1")
    await api.plan("a1", "p", free_voice_micros=200 * CREDIT)
    await api.client("c1", "a1", "p")
    await api.authorize("s1", "c1")
    call, _ = await api.start_call("s1", "c1")
    summary = (await api.end_call(call, 2)).summary
    assert summary.billed_seconds == 2
    assert summary.client_charged_micros == 33_334  # ceil(1,000,000 * 2 / 60)
    assert summary.agency_charged_micros == 33_334
    assert (await api.balance("c1")).voice.free_micros == 200 * CREDIT - 33_334
    assert (await api.balance("a1")).voice.free_micros == 300 * CREDIT - 33_334


async def test_client_sees_the_allowance_of_its_plan_not_the_agencys(api: Api) -> None:
    await api.agency("a1")
    await api.plan("a1", "p", free_voice_micros=200 * CREDIT)
    await api.client("c1", "a1", "p")
    assert (await api.balance("a1")).voice.free_micros == 300 * CREDIT
    assert (await api.balance("c1")).voice.free_micros == 200 * CREDIT


async def test_both_agency_and_client_must_have_credits(api: Api) -> None:
    await api.agency("rich", free_voice_micros=100 * CREDIT)
    await api.agency("broke", free_voice_micros=0)
    await api.plan("rich", "empty", free_voice_micros=0)
    await api.plan("broke", "full", free_voice_micros=100 * CREDIT)
    await api.client("no-credit-client", "rich", "empty")
    await api.client("no-credit-agency", "broke", "full")

    denied = await api.authorize("s1", "no-credit-client")
    assert (denied.allowed, denied.deny_reason) == (False, common_pb2.DENY_REASON_CLIENT_CREDITS_EXHAUSTED)
    denied = await api.authorize("s2", "no-credit-agency")
    assert (denied.allowed, denied.deny_reason) == (False, common_pb2.DENY_REASON_AGENCY_CREDITS_EXHAUSTED)

    await api.topup("no-credit-client", CREDIT, "buy-1")
    assert (await api.authorize("s3", "no-credit-client")).allowed
    # a denial reserves nothing
    assert (await api.balance("broke")).voice.reserved_micros == 0


async def test_usage_limit_stops_the_ai_whatever_the_balance(server: Running) -> None:
    api = server.api
    await api.agency("a1", free_voice_micros=1000 * CREDIT, default_voice_micros_per_minute=60 * CREDIT)
    await api.plan(
        "a1",
        "p",
        free_voice_micros=1000 * CREDIT,
        default_voice_micros_per_minute=60 * CREDIT,
        usage_limit_micros=10 * CREDIT,
    )
    await api.client("c1", "a1", "p")
    first = await api.authorize("s1", "c1")
    assert first.granted_seconds == 10  # 60 credits a minute: the 10-credit limit lasts 10 s
    call, _ = await api.start_call("s1", "c1")
    await api.end_call(call, 10)
    denied = await api.authorize("s2", "c1")
    assert (denied.allowed, denied.deny_reason) == (False, common_pb2.DENY_REASON_USAGE_LIMIT_REACHED)
    balance = (await api.balance("c1")).voice
    assert balance.free_micros == 990 * CREDIT  # plenty left, still stopped
    assert balance.period_used_micros == balance.usage_limit_micros == 10 * CREDIT
    await server.app.flusher.flush()
    events = await api.ledger.ListEvents(ledger_pb2.ListEventsRequest(account_id="c1"), metadata=api.metadata)
    assert [e.type for e in events.events].count(ledger_pb2.EVENT_TYPE_LIMIT_REACHED) == 1


async def test_agency_paid_client_is_covered_by_the_agency_up_to_its_limit(api: Api) -> None:
    # 6,000 credits a minute = 100 credits a second, so 500 credits are 5 seconds of talk.
    rate = 6000 * CREDIT
    await api.agency("a1", free_voice_micros=300 * CREDIT, default_voice_micros_per_minute=rate)
    await api.plan("a1", "covered", default_voice_micros_per_minute=rate, usage_limit_micros=500 * CREDIT)
    await api.client("c1", "a1", "covered", common_pb2.BILLING_MODE_AGENCY_PAID)
    await api.topup("a1", 200 * CREDIT, "buy-200")  # 300 free + 200 purchased = 500 covered

    granted = await api.authorize("s1", "c1")
    assert (granted.allowed, granted.granted_seconds) == (True, 5)
    call, _ = await api.start_call("s1", "c1")
    summary = (await api.end_call(call, 5)).summary
    assert summary.agency_charged_micros == 500 * CREDIT
    client = (await api.balance("c1")).voice
    assert (client.has_wallet, client.free_micros, client.purchased_micros) == (False, 0, 0)
    assert client.period_used_micros == 500 * CREDIT

    denied = await api.authorize("s2", "c1")
    assert (denied.allowed, denied.deny_reason) == (False, common_pb2.DENY_REASON_USAGE_LIMIT_REACHED)

    await api.topup("a1", 100 * CREDIT, "buy-100")
    still = await api.authorize("s3", "c1")
    assert (still.allowed, still.deny_reason) == (False, common_pb2.DENY_REASON_USAGE_LIMIT_REACHED)
    await api.accounts.UpdatePlan(
        account_pb2.UpdatePlanRequest(
            plan=account_pb2.Plan(agency_id="a1", plan_id="covered", usage_limit_micros=600 * CREDIT),
            update_mask=field_mask_pb2.FieldMask(paths=["usage_limit_micros"]),
        ),
        metadata=api.metadata,
    )
    works = await api.authorize("s4", "c1")
    assert (works.allowed, works.granted_seconds) == (True, 1)

    # An AGENCY_PAID client has no wallet to top up.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await api.topup("c1", CREDIT, "client-buy")
    assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(raised.value).reason == "NO_WALLET"


async def test_free_credits_are_used_before_purchased_ones(api: Api) -> None:
    await api.agency("a1", free_voice_micros=10_000 * CREDIT)
    await api.plan("a1", "p", free_voice_micros=CREDIT)  # one free minute
    await api.client("c1", "a1", "p")
    await api.topup("c1", 5 * CREDIT, "buy")
    await api.authorize("s1", "c1")
    call, _ = await api.start_call("s1", "c1")
    await api.end_call(call, 30)
    await api.authorize("s2", "c1")
    call, _ = await api.start_call("s2", "c1")
    await api.end_call(call, 60)

    balance = (await api.balance("c1")).voice
    assert (balance.free_micros, balance.purchased_micros) == (0, 4_500_000)
    entries = await api.ledger.ListLedgerEntries(
        ledger_pb2.ListLedgerEntriesRequest(account_id="c1", balance_type=common_pb2.BALANCE_TYPE_VOICE),
        metadata=api.metadata,
    )
    usage = [e for e in entries.entries if e.kind == ledger_pb2.LEDGER_ENTRY_KIND_VOICE_USAGE]
    # newest first: the second call took the last 0.5 free credit, then 0.5 purchased
    assert [(e.session_id, e.free_micros, e.purchased_micros) for e in usage] == [
        ("s2", -500_000, -500_000),
        ("s1", -500_000, 0),
    ]


async def test_free_credits_reset_at_the_period_boundary_and_purchased_stay(make_server) -> None:  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    clock = ManualClock(datetime(2026, 1, 31, 23, 59, tzinfo=UTC).timestamp())
    async with make_server(clock=clock) as running:
        api = running.api
        await api.agency("a1")
        await api.plan("a1", "p", free_voice_micros=200 * CREDIT)
        await api.client("c1", "a1", "p")
        await api.topup("c1", 50 * CREDIT, "buy")
        await api.authorize("s1", "c1")
        call, _ = await api.start_call("s1", "c1")
        await api.end_call(call, 60)  # one credit of free
        january = (await api.balance("c1")).voice
        assert (january.free_micros, january.purchased_micros) == (199 * CREDIT, 50 * CREDIT)
        assert january.period_end.ToSeconds() == int(datetime(2026, 2, 1, tzinfo=UTC).timestamp())

        await clock.advance(datetime(2026, 2, 1, 0, 0, 1, tzinfo=UTC).timestamp() - clock.now())
        february = (await api.balance("c1")).voice
        assert (february.free_micros, february.purchased_micros) == (200 * CREDIT, 50 * CREDIT)
        assert february.period_used_micros == 0
        await running.app.flusher.flush()
        entries = await api.ledger.ListLedgerEntries(
            ledger_pb2.ListLedgerEntriesRequest(account_id="c1"), metadata=api.metadata
        )
        kinds = [(e.kind, e.free_micros) for e in entries.entries if e.balance_type == common_pb2.BALANCE_TYPE_VOICE]
        assert kinds[:2] == [
            (ledger_pb2.LEDGER_ENTRY_KIND_FREE_ALLOWANCE, 200 * CREDIT),
            (ledger_pb2.LEDGER_ENTRY_KIND_FREE_EXPIRY, -199 * CREDIT),
        ]


async def _sms_stream(api: Api, session_id: str, client_id: str):  # type: ignore[no-untyped-def]
    call = api.stream()
    await call.write(
        metering_pb2.StreamUsageRequest(
            start=metering_pb2.SessionStart(session_id=session_id, client_id=client_id, channel=common_pb2.CHANNEL_SMS)
        )
    )
    return call


async def _send(call, message_id: str, country: str = "US", segments: int = 1):  # type: ignore[no-untyped-def]
    await call.write(
        metering_pb2.StreamUsageRequest(
            sms=metering_pb2.SmsSend(message_id=message_id, destination_country=country, segments=segments)
        )
    )
    return (await call.read()).sms_result


async def test_83_free_sms_credits_pay_for_exactly_500_us_segments(api: Api) -> None:
    await api.agency("a1")
    await api.plan("a1", "p", free_sms_micros=1000 * CREDIT)
    await api.client("c1", "a1", "p")
    call = await _sms_stream(api, "sms-1", "c1")
    for n in range(500):
        result = await _send(call, f"m{n}")
        assert result.allowed and result.charged_micros == 166_000
    denied = await _send(call, "m500")
    assert (denied.allowed, denied.deny_reason) == (False, common_pb2.DENY_REASON_AGENCY_CREDITS_EXHAUSTED)
    cutoff = await call.read()
    assert cutoff.cutoff.reason == common_pb2.DENY_REASON_AGENCY_CREDITS_EXHAUSTED
    assert (await api.balance("a1")).sms.free_micros == 0
    events = await api.ledger.ListEvents(ledger_pb2.ListEventsRequest(account_id="c1"), metadata=api.metadata)
    cutoffs = [e for e in events.events if e.type == ledger_pb2.EVENT_TYPE_CUTOFF]
    assert [(e.balance_type, e.reason, e.attributes["message_id"]) for e in cutoffs] == [
        (common_pb2.BALANCE_TYPE_SMS, common_pb2.DENY_REASON_AGENCY_CREDITS_EXHAUSTED, "m500")
    ]


async def test_sms_prices_depend_on_the_destination_country(api: Api) -> None:
    await api.agency("a1", sms_rates={"GB": 400_000})
    await api.plan("a1", "p", free_sms_micros=100 * CREDIT, sms_rates={"GB": 700_000, "DE": 500_000})
    await api.client("c1", "a1", "p")
    call = await _sms_stream(api, "sms-1", "c1")
    assert (await _send(call, "uk", "gb", 2)).charged_micros == 1_400_000
    assert (await _send(call, "de", "DE")).charged_micros == 500_000
    assert (await _send(call, "us", "US")).charged_micros == 166_000
    agency = (await api.balance("a1")).sms
    assert agency.free_micros == 83 * CREDIT - 800_000 - 166_000 - 166_000  # GB at 0.4; DE and US at 0.166


async def test_per_provider_plan_price_while_the_agency_pays_the_platform_rate(api: Api) -> None:
    await api.agency("a1")
    await api.plan("a1", "p", free_voice_micros=100 * CREDIT, voice_rates={"elevenlabs": 1_500_000})
    await api.client("c1", "a1", "p")
    await api.authorize("s1", "c1", provider="elevenlabs")
    call, _ = await api.start_call("s1", "c1")
    summary = (await api.end_call(call, 60)).summary
    assert summary.client_charged_micros == 1_500_000
    assert summary.agency_charged_micros == CREDIT
    await api.authorize("s2", "c1", provider="deepgram")
    call, _ = await api.start_call("s2", "c1")
    assert (await api.end_call(call, 60)).summary.client_charged_micros == CREDIT


async def test_inactive_subscription_denies_that_direction(api: Api) -> None:
    await api.agency("a1")
    await api.plan("a1", "p", free_voice_micros=100 * CREDIT)
    await api.client("c1", "a1", "p")
    await api.accounts.UpdateSubscription(
        account_pb2.UpdateSubscriptionRequest(account_id="c1", inbound_active=False), metadata=api.metadata
    )
    denied = await api.authorize("s1", "c1", INBOUND)
    assert (denied.allowed, denied.deny_reason) == (False, common_pb2.DENY_REASON_SUBSCRIPTION_INACTIVE)
    assert (await api.authorize("s2", "c1", OUTBOUND)).allowed
    await api.accounts.UpdateSubscription(
        account_pb2.UpdateSubscriptionRequest(account_id="a1", outbound_active=False), metadata=api.metadata
    )
    denied = await api.authorize("s3", "c1", OUTBOUND)
    assert denied.deny_reason == common_pb2.DENY_REASON_SUBSCRIPTION_INACTIVE


async def test_auto_refill_one_request_per_crossing_at_most_n_per_period(make_server) -> None:  # type: ignore[no-untyped-def]
    async with make_server() as running:
        api = running.api
        await api.agency("a1", free_voice_micros=10_000 * CREDIT)
        await api.plan("a1", "p", free_voice_micros=0)
        await api.client("c1", "a1", "p")
        await api.topup("c1", 10 * CREDIT, "initial")
        await api.accounts.SetAutoRefill(
            account_pb2.SetAutoRefillRequest(
                account_id="c1",
                balance_type=common_pb2.BALANCE_TYPE_VOICE,
                auto_refill=account_pb2.AutoRefill(
                    enabled=True, threshold_micros=5 * CREDIT, amount_micros=20 * CREDIT, max_refills_per_period=1
                ),
            ),
            metadata=api.metadata,
        )
        await api.accounts.SetLowBalanceWarning(
            account_pb2.SetLowBalanceWarningRequest(
                account_id="c1", balance_type=common_pb2.BALANCE_TYPE_VOICE, threshold_micros=5 * CREDIT
            ),
            metadata=api.metadata,
        )

        async def talk(session_id: str, seconds: int) -> None:
            assert (await api.authorize(session_id, "c1")).allowed
            call, _ = await api.start_call(session_id, "c1")
            await api.end_call(call, seconds)

        async def events(kind: int) -> list[ledger_pb2.Event]:
            await running.app.flusher.flush()
            listed = await api.ledger.ListEvents(ledger_pb2.ListEventsRequest(account_id="c1"), metadata=api.metadata)
            return [e for e in listed.events if e.type == kind]

        await talk("s1", 60)  # 9 left after settling: above the threshold
        assert await events(ledger_pb2.EVENT_TYPE_REFILL_REQUESTED) == []
        # reserving a 60 s slice takes the available balance from 9 to 8, settling below... talk 5 min
        await talk("s2", 60)
        await talk("s3", 60)
        await talk("s4", 60)
        await talk("s5", 60)  # 5 left
        await talk("s6", 60)  # crosses 5 -> exactly one request
        await talk("s7", 60)
        requests = await events(ledger_pb2.EVENT_TYPE_REFILL_REQUESTED)
        assert len(requests) == 1
        assert requests[0].amount_micros == 20 * CREDIT
        assert len(await events(ledger_pb2.EVENT_TYPE_LOW_BALANCE)) == 1
        key = requests[0].idempotency_key
        assert key.startswith("refill:c1:voice:")

        await api.topup("c1", 20 * CREDIT, key, kind=ledger_pb2.TOPUP_KIND_AUTO_REFILL)
        await api.topup("c1", 20 * CREDIT, key, kind=ledger_pb2.TOPUP_KIND_AUTO_REFILL)  # a retried webhook
        assert (await api.balance("c1")).voice.purchased_micros == 23 * CREDIT
        for n in range(19):  # cross the threshold again: the period's one refill is spent
            await talk(f"again-{n}", 60)
        assert len(await events(ledger_pb2.EVENT_TYPE_REFILL_REQUESTED)) == 1
        assert len(await events(ledger_pb2.EVENT_TYPE_LOW_BALANCE)) == 2
