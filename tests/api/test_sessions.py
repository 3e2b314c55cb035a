"""Sessions (SPEC §4): slices, warning, cutoff on the server's timer, pools, resume, operators.

The server runs on a ManualClock: each test moves time itself and checks what happened at
the exact second it should (and not a quarter of a second before). The default settings
apply unless a test says otherwise: 60 s slices, renewal 15 s before a grant ends, the
warning 10 s before a final grant ends, 30 s of grace, authorizations held 60 s. One test
at the end runs on the real clock, to show the real timers are wired.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from creditd_client.v1 import account_pb2, common_pb2, ledger_pb2, metering_pb2
from google.protobuf import field_mask_pb2

from creditd.domain.records import DenyReason
from creditd.engine.clock import ManualClock
from tests.calls import Call, session, until
from tests.conftest import CREDIT, Api, Running, ServerFactory, error_info

PER_SECOND = 60 * CREDIT  # one credit a second
INBOUND, OUTBOUND = common_pb2.DIRECTION_INBOUND, common_pb2.DIRECTION_OUTBOUND


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def running(make_server: ServerFactory, clock: ManualClock) -> AsyncIterator[Running]:
    async with make_server(clock=clock) as server:
        yield server


async def _one_credit_a_second(
    api: Api, agency_credits: int = 10_000, client_credits: int = 10_000, **plan: int
) -> None:
    await api.agency("a1", free_voice_micros=agency_credits * CREDIT, default_voice_micros_per_minute=PER_SECOND)
    await api.plan(
        "a1", "p", free_voice_micros=client_credits * CREDIT, default_voice_micros_per_minute=PER_SECOND, **plan
    )


async def _answered(api: Api, session_id: str = "s1", client_id: str = "c1", direction: int = INBOUND) -> Call:
    assert (await api.authorize(session_id, client_id, direction)).allowed
    call = Call(api)
    first = await call.start(session_id, client_id)
    assert first.WhichOneof("msg") == "grant"
    return call


async def _update_limit(api: Api, micros: int) -> None:
    await api.accounts.UpdatePlan(
        account_pb2.UpdatePlanRequest(
            plan=account_pb2.Plan(agency_id="a1", plan_id="p", usage_limit_micros=micros),
            update_mask=field_mask_pb2.FieldMask(paths=["usage_limit_micros"]),
        ),
        metadata=api.metadata,
    )


async def test_the_last_grant_ends_in_a_warning_then_a_cutoff_at_its_exact_end(
    running: Running, clock: ManualClock
) -> None:
    api = running.api
    await _one_credit_a_second(api, client_credits=75)  # 75 seconds of talk
    await api.client("c1", "a1", "p")
    call = await _answered(api)
    assert call.messages[0].grant.granted_seconds == 60

    await clock.advance(44.75)
    assert session(running, "s1").granted == 60  # type: ignore[union-attr]
    await clock.advance(0.25)  # 15 s before the end: the renewal finds 15 s more, and no further
    assert (await call.next()).grant.granted_seconds == 75

    await clock.advance(19.75)
    assert not session(running, "s1").warned  # type: ignore[union-attr]
    await clock.advance(0.25)  # 10 s before the end of the final grant
    assert (await call.next()).warning.remaining_seconds == 10

    await clock.advance(9.75)
    assert session(running, "s1").final is None  # type: ignore[union-attr]
    assert call.pending() == []
    await clock.advance(0.25)  # the grant ends: cut now, with no usage report ever sent
    cutoff = (await call.next()).cutoff
    assert (cutoff.reason, cutoff.billed_seconds) == (common_pb2.DENY_REASON_CLIENT_CREDITS_EXHAUSTED, 75)
    assert await call.ended() is None
    balance = (await api.balance("c1")).voice
    assert (balance.free_micros, balance.reserved_micros, balance.period_used_micros) == (0, 0, 75 * CREDIT)


async def test_slices_are_renewed_the_renewal_lead_before_the_grant_ends(
    make_server: ServerFactory, clock: ManualClock
) -> None:
    async with make_server(clock=clock, renewal_lead_seconds=20) as running:
        api = running.api
        await _one_credit_a_second(api)
        await api.client("c1", "a1", "p")
        call = await _answered(api)
        await clock.advance(39.75)
        assert call.pending() == [] and session(running, "s1").granted == 60  # type: ignore[union-attr]
        await clock.advance(0.25)
        assert (await call.next()).grant.granted_seconds == 120
        assert (await api.balance("c1")).voice.reserved_micros == 120 * CREDIT
        await clock.advance(60)
        assert (await call.next()).grant.granted_seconds == 180
        summary = (await call.end(101)).summary
        assert (summary.billed_seconds, summary.client_charged_micros) == (101, 101 * CREDIT)
        balance = (await api.balance("c1")).voice
        assert (balance.reserved_micros, balance.period_used_micros) == (0, 101 * CREDIT)


async def test_one_agency_pool_is_shared_by_the_concurrent_calls_of_its_clients(
    running: Running, clock: ManualClock
) -> None:
    api = running.api
    await _one_credit_a_second(api, agency_credits=150)
    clients = [f"c{n}" for n in range(4)]
    for client in clients:
        await api.client(client, "a1", "p")
    calls = {}
    for client in clients:
        if (await api.authorize(f"s-{client}", client)).allowed:
            calls[client] = Call(api)
            await calls[client].start(f"s-{client}", client)
    assert len(calls) == 3  # 60 + 60 + 30 seconds: the pool is taken
    await clock.advance(120)
    billed = 0
    for call in calls.values():
        granted = max(m.grant.granted_seconds for m in call.messages if m.WhichOneof("msg") == "grant")
        cutoff = (await call.next("cutoff")).cutoff
        assert cutoff.reason == common_pb2.DENY_REASON_AGENCY_CREDITS_EXHAUSTED
        assert cutoff.billed_seconds == granted  # cut at the end of its grant, not a second past it
        billed += cutoff.billed_seconds
    assert billed == 150  # exactly what the pool held
    agency = (await api.balance("a1")).voice
    assert (agency.free_micros, agency.purchased_micros, agency.reserved_micros) == (0, 0, 0)


async def test_a_dropped_stream_can_be_resumed_within_the_grace_period(running: Running, clock: ManualClock) -> None:
    api = running.api
    await _one_credit_a_second(api)
    await api.client("c1", "a1", "p")
    call = await _answered(api)
    await clock.advance(5)
    call.cancel()
    await until(lambda: session(running, "s1").stream is None, "the server noticed the drop")  # type: ignore[union-attr]
    await clock.advance(29.75)  # the grace period is 30 s
    resumed = Call(api)
    grant = (await resumed.start("s1", "c1")).grant
    assert grant.granted_seconds == 60
    assert grant.expires_at.ToSeconds() == int(session(running, "s1").started_at) + 60  # type: ignore[union-attr]
    await clock.advance(10.25)  # 45 s: the call goes on, renewed as before
    assert (await resumed.next()).grant.granted_seconds == 120
    summary = (await resumed.end(45)).summary
    assert summary.billed_seconds == 45
    assert (await api.balance("c1")).voice.reserved_micros == 0


async def test_a_dropped_stream_not_resumed_is_billed_until_the_grace_period_ends(
    running: Running, clock: ManualClock
) -> None:
    api = running.api
    await _one_credit_a_second(api)
    await api.client("c1", "a1", "p")
    call = await _answered(api)
    await clock.advance(5)
    call.cancel()
    await until(lambda: session(running, "s1").stream is None, "the server noticed the drop")  # type: ignore[union-attr]
    await clock.advance(29.75)
    assert session(running, "s1") is not None  # still resumable
    await clock.advance(0.25)
    assert session(running, "s1") is None  # settled: 5 s talked + 30 s of grace
    balance = (await api.balance("c1")).voice
    assert (balance.reserved_micros, balance.period_used_micros) == (0, 35 * CREDIT)
    final = await Call(api).start("s1", "c1")
    assert (final.cutoff.reason, final.cutoff.billed_seconds) == (common_pb2.DENY_REASON_SESSION_ABANDONED, 35)


async def test_a_dropped_stream_whose_grant_ends_within_the_grace_period_is_billed_to_the_grant(
    running: Running, clock: ManualClock
) -> None:
    api = running.api
    await _one_credit_a_second(api, client_credits=40)  # the first grant is 40 s, and final
    await api.client("c1", "a1", "p")
    call = await _answered(api)
    await clock.advance(20)
    call.cancel()
    await until(lambda: session(running, "s1").stream is None, "the server noticed the drop")  # type: ignore[union-attr]
    await clock.advance(19.75)
    assert session(running, "s1") is not None
    await clock.advance(0.25)  # 40 s: the grant ended before the grace period (50 s) did
    assert session(running, "s1") is None
    balance = (await api.balance("c1")).voice
    assert (balance.free_micros, balance.reserved_micros, balance.period_used_micros) == (0, 0, 40 * CREDIT)
    final = await Call(api).start("s1", "c1")
    assert (final.cutoff.reason, final.cutoff.billed_seconds) == (common_pb2.DENY_REASON_SESSION_ABANDONED, 40)


async def test_an_authorization_never_started_is_released_when_it_expires(running: Running, clock: ManualClock) -> None:
    api = running.api
    await _one_credit_a_second(api)
    await api.client("c1", "a1", "p")
    authorization = await api.authorize("s1", "c1")
    assert authorization.expires_at.ToSeconds() == int(clock.now()) + 60
    await clock.advance(59.75)
    assert (await api.balance("c1")).voice.reserved_micros == 60 * CREDIT
    await clock.advance(0.25)
    balance = (await api.balance("c1")).voice
    assert (balance.reserved_micros, balance.period_used_micros) == (0, 0)
    final = await Call(api).start("s1", "c1")
    assert (final.cutoff.reason, final.cutoff.billed_seconds) == (common_pb2.DENY_REASON_SESSION_ABANDONED, 0)


async def test_authorize_is_idempotent_by_session_id(api: Api) -> None:
    await _one_credit_a_second(api)
    await api.client("c1", "a1", "p")
    await api.client("c2", "a1", "p")
    first = await api.authorize("s1", "c1")
    again = await api.authorize("s1", "c1")
    assert (again.allowed, again.granted_seconds, again.expires_at) == (True, first.granted_seconds, first.expires_at)
    assert (await api.balance("c1")).voice.reserved_micros == 60 * CREDIT  # one slice, not two
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await api.authorize("s1", "c2")  # another client of the same agency
    assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(raised.value).reason == "SESSION_ID_REUSED"


async def test_concurrency_cap_of_the_plan(api: Api) -> None:
    await _one_credit_a_second(api)
    await api.plan("a1", "one-line", free_voice_micros=100 * CREDIT, max_concurrent_sessions=1)
    await api.client("c1", "a1", "one-line")
    assert (await api.authorize("s1", "c1")).allowed
    denied = await api.authorize("s2", "c1")
    assert denied.deny_reason == common_pb2.DENY_REASON_CONCURRENCY_LIMIT_REACHED
    call = Call(api)
    await call.start("s1", "c1")
    await call.end(1)
    assert (await api.authorize("s3", "c1")).allowed


async def test_suspending_inbound_cuts_inbound_calls_at_once_and_leaves_outbound_ones(
    running: Running, clock: ManualClock
) -> None:
    api = running.api
    await _one_credit_a_second(api)
    await api.client("c1", "a1", "p")
    inbound = await _answered(api, "in", direction=INBOUND)
    outbound = await _answered(api, "out", direction=OUTBOUND)
    await clock.advance(1.25)
    await api.accounts.UpdateSubscription(
        account_pb2.UpdateSubscriptionRequest(account_id="a1", inbound_active=False, outbound_active=True),
        metadata=api.metadata,
    )
    cutoff = (await inbound.next("cutoff")).cutoff  # at once: no time passes on the server's clock
    assert (cutoff.reason, cutoff.billed_seconds) == (common_pb2.DENY_REASON_SUBSCRIPTION_INACTIVE, 2)
    assert session(running, "out") is not None and outbound.pending() == []
    await clock.advance(45)  # the outbound call renews as before
    assert (await outbound.next()).grant.granted_seconds == 120
    assert (await outbound.end(50)).summary.billed_seconds == 50
    assert (await api.balance("c1")).voice.period_used_micros == 52 * CREDIT
    denied = await api.authorize("in-2", "c1", INBOUND)
    assert denied.deny_reason == common_pb2.DENY_REASON_SUBSCRIPTION_INACTIVE


async def test_a_top_up_lets_a_call_on_its_final_grant_go_on(running: Running, clock: ManualClock) -> None:
    api = running.api
    await _one_credit_a_second(api, client_credits=70)
    await api.client("c1", "a1", "p")
    call = await _answered(api)
    await clock.advance(45)
    assert (await call.next()).grant.granted_seconds == 70  # all that is left: final
    await api.topup("c1", 100 * CREDIT, "rescue")
    live = session(running, "s1")
    assert live is not None
    await until(lambda: live.exhausted is DenyReason.NONE, "the top-up reached the call")
    await clock.advance(10)  # 15 s before the end, as any renewal
    assert (await call.next()).grant.granted_seconds == 130
    assert call.pending() == []  # no warning: the grant was not final anymore
    assert (await call.end(80)).summary.billed_seconds == 80


async def test_lowering_a_limit_below_what_is_in_use_cuts_the_call(running: Running, clock: ManualClock) -> None:
    api = running.api
    await _one_credit_a_second(api, usage_limit_micros=1000 * CREDIT)
    await api.client("c1", "a1", "p")
    call = await _answered(api)
    await clock.advance(30)
    await _update_limit(api, 50 * CREDIT)  # 60 s are reserved: more than the new limit allows
    cutoff = (await call.next("cutoff")).cutoff
    assert (cutoff.reason, cutoff.billed_seconds) == (common_pb2.DENY_REASON_USAGE_LIMIT_REACHED, 30)
    balance = (await api.balance("c1")).voice
    assert (balance.reserved_micros, balance.period_used_micros) == (0, 30 * CREDIT)


async def test_raising_a_limit_lets_a_final_grant_renew_again(running: Running, clock: ManualClock) -> None:
    api = running.api
    await _one_credit_a_second(api, usage_limit_micros=70 * CREDIT)
    await api.client("c1", "a1", "p")
    call = await _answered(api)
    await clock.advance(45)
    assert (await call.next()).grant.granted_seconds == 70  # the limit binds: final
    await _update_limit(api, 200 * CREDIT)
    live = session(running, "s1")
    assert live is not None
    await until(lambda: live.exhausted is DenyReason.NONE, "the new limit reached the call")
    await clock.advance(10)
    assert (await call.next()).grant.granted_seconds == 130
    assert (await call.end(100)).summary.billed_seconds == 100


async def test_a_usage_limit_applies_to_voice_and_sms_separately(running: Running, clock: ManualClock) -> None:
    api = running.api
    await api.agency("a1", default_voice_micros_per_minute=PER_SECOND)
    await api.plan(
        "a1",
        "p",
        free_voice_micros=1000 * CREDIT,
        free_sms_micros=1000 * CREDIT,
        default_voice_micros_per_minute=PER_SECOND,
        default_sms_micros_per_segment=CREDIT,
        usage_limit_micros=10 * CREDIT,
    )
    await api.client("c1", "a1", "p")
    call = await _answered(api)
    assert call.messages[0].grant.granted_seconds == 10  # the voice limit: 10 credits
    await clock.advance(10)
    assert (await call.next("cutoff")).cutoff.reason == common_pb2.DENY_REASON_USAGE_LIMIT_REACHED
    voice_denied = await api.authorize("s2", "c1")
    assert voice_denied.deny_reason == common_pb2.DENY_REASON_USAGE_LIMIT_REACHED

    sms = Call(api)  # SMS have a limit of their own: 10 one-credit segments
    await sms.call.write(
        metering_pb2.StreamUsageRequest(
            start=metering_pb2.SessionStart(session_id="texts", client_id="c1", channel=common_pb2.CHANNEL_SMS)
        )
    )
    for n in range(11):
        send = metering_pb2.SmsSend(message_id=f"m{n}", destination_country="US", segments=1)
        await sms.call.write(metering_pb2.StreamUsageRequest(sms=send))
        result = (await sms.next("sms_result")).sms_result
        assert result.allowed is (n < 10), n
    assert result.deny_reason == common_pb2.DENY_REASON_USAGE_LIMIT_REACHED
    balance = await api.balance("c1")
    assert (balance.voice.period_used_micros, balance.sms.period_used_micros) == (10 * CREDIT, 10 * CREDIT)


async def test_sms_message_ids_are_charged_once(api: Api) -> None:
    await api.agency("a1")
    await api.plan("a1", "p", free_sms_micros=10 * CREDIT)
    await api.client("c1", "a1", "p")
    call = api.stream()
    start = metering_pb2.SessionStart(session_id="sms", client_id="c1", channel=common_pb2.CHANNEL_SMS)
    await call.write(metering_pb2.StreamUsageRequest(start=start))
    send = metering_pb2.SmsSend(message_id="m1", destination_country="US", segments=2)
    for _ in range(3):
        await call.write(metering_pb2.StreamUsageRequest(sms=send))
        result = (await call.read()).sms_result
        assert (result.message_id, result.allowed, result.charged_micros) == ("m1", True, 332_000)
    await call.write(metering_pb2.StreamUsageRequest(end=metering_pb2.SessionEnd()))
    summary = (await call.read()).summary
    assert (summary.messages_sent, summary.client_charged_micros, summary.agency_charged_micros) == (
        1,
        332_000,
        332_000,
    )
    assert (await api.balance("c1")).sms.free_micros == 10 * CREDIT - 332_000
    # a new stream retrying the same message is not charged either
    retry = api.stream()
    await retry.write(metering_pb2.StreamUsageRequest(start=start))
    await retry.write(metering_pb2.StreamUsageRequest(sms=send))
    assert (await retry.read()).sms_result.allowed
    assert (await api.balance("c1")).sms.free_micros == 10 * CREDIT - 332_000


async def test_an_sms_stream_closed_without_session_end_ends_with_its_summary(api: Api) -> None:
    await api.agency("a1")
    await api.plan("a1", "p", free_sms_micros=10 * CREDIT)
    await api.client("c1", "a1", "p")
    call = api.stream()
    start = metering_pb2.SessionStart(session_id="sms", client_id="c1", channel=common_pb2.CHANNEL_SMS)
    await call.write(metering_pb2.StreamUsageRequest(start=start))
    await call.write(
        metering_pb2.StreamUsageRequest(sms=metering_pb2.SmsSend(message_id="m1", destination_country="US", segments=1))
    )
    assert (await call.read()).sms_result.allowed
    await call.done_writing()  # a half-close is the normal end of an SMS stream
    summary = (await call.read()).summary
    assert (summary.messages_sent, summary.client_charged_micros) == (1, 166_000)
    assert await call.read() is grpc.aio.EOF
    assert (await call.code()) is grpc.StatusCode.OK


async def test_topup_is_idempotent_by_key(server: Running) -> None:
    api = server.api
    await api.agency("a1")
    first = await api.topup("a1", 5 * CREDIT, "pi_123")
    again = await api.topup("a1", 5 * CREDIT, "pi_123")
    assert again.entry_id == first.entry_id
    assert (await api.balance("a1")).voice.purchased_micros == 5 * CREDIT
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await api.topup("a1", 6 * CREDIT, "pi_123")
    assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(raised.value)
    assert info.reason == "IDEMPOTENCY_KEY_REUSED" and info.metadata["entry_id"] == first.entry_id
    assert (await api.balance("a1")).voice.purchased_micros == 5 * CREDIT
    entries = await api.ledger.ListLedgerEntries(
        ledger_pb2.ListLedgerEntriesRequest(account_id="a1"), metadata=api.metadata
    )
    topups = [e for e in entries.entries if e.kind == ledger_pb2.LEDGER_ENTRY_KIND_TOPUP]
    assert [(e.entry_id, e.purchased_micros, e.idempotency_key) for e in topups] == [
        (first.entry_id, 5 * CREDIT, "pi_123")
    ]


async def test_a_grant_top_up_adds_free_credits(api: Api) -> None:
    await api.agency("a1", free_voice_micros=0)
    response = await api.topup("a1", 7 * CREDIT, "promo", kind=ledger_pb2.TOPUP_KIND_GRANT)
    assert (response.balance.free_micros, response.balance.purchased_micros) == (7 * CREDIT, 0)


async def test_on_the_real_clock_a_short_call_is_renewed_warned_and_cut_on_time(make_server: ServerFactory) -> None:
    fast = {"slice_seconds": 2, "renewal_lead_seconds": 1.0, "warning_seconds": 1.0}
    async with make_server(**fast) as running:
        api = running.api
        await _one_credit_a_second(api, client_credits=3)
        await api.client("c1", "a1", "p")
        assert (await api.authorize("s1", "c1")).granted_seconds == 2
        call = Call(api)
        answered = time.monotonic()
        await call.start("s1", "c1")
        assert (await call.next()).grant.granted_seconds == 3  # the renewal could add one second
        assert (await call.next()).warning.remaining_seconds == 1
        cutoff = (await call.next()).cutoff
        cut_after = time.monotonic() - answered
        assert (cutoff.reason, cutoff.billed_seconds) == (common_pb2.DENY_REASON_CLIENT_CREDITS_EXHAUSTED, 3)
        assert cut_after >= 2.9, f"cut {cut_after:.3f}s after the answer, before the grant ended at 3 s"
        balance = (await api.balance("c1")).voice
        assert (balance.free_micros, balance.reserved_micros) == (0, 0)
        await asyncio.wait_for(call.ended(), 10)
