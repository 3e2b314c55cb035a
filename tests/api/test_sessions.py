"""Sessions (SPEC §4): slices, warning, cutoff on the server's timer, pools, resume, idempotency."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from creditd_client.v1 import account_pb2, common_pb2, ledger_pb2, metering_pb2

from tests.conftest import CREDIT, Api, Running, ServerFactory, error_info

FAST = {"slice_seconds": 2, "renewal_lead_seconds": 1.0, "warning_seconds": 1.0, "grace_seconds": 1.0}
PER_SECOND = 60 * CREDIT  # one credit a second


async def _one_credit_a_second(api: Api, agency_credits: int = 1000, client_credits: int = 1000) -> None:
    await api.agency("a1", free_voice_micros=agency_credits * CREDIT, default_voice_micros_per_minute=PER_SECOND)
    await api.plan("a1", "p", free_voice_micros=client_credits * CREDIT, default_voice_micros_per_minute=PER_SECOND)


async def test_cutoff_arrives_at_the_end_of_the_last_grant_without_reports(make_server: ServerFactory) -> None:
    async with make_server(**FAST) as running:
        api = running.api
        await _one_credit_a_second(api, client_credits=3)
        await api.client("c1", "a1", "p")
        assert (await api.authorize("s1", "c1")).granted_seconds == 2
        started = time.monotonic()
        call, first = await api.start_call("s1", "c1")
        assert first.grant.granted_seconds == 2
        received = []
        while True:
            message = await call.read()
            received.append((message.WhichOneof("msg"), time.monotonic() - started, message))
            if message.WhichOneof("msg") == "cutoff":
                break
        kinds = [kind for kind, _, _ in received]
        assert kinds == ["grant", "warning", "cutoff"]
        grant, warning, cutoff = (m for _, _, m in received)
        assert grant.grant.granted_seconds == 3  # the renewal could only add one second
        assert warning.warning.remaining_seconds == 1
        assert cutoff.cutoff.reason == common_pb2.DENY_REASON_CLIENT_CREDITS_EXHAUSTED
        assert cutoff.cutoff.billed_seconds == 3
        cutoff_at = received[-1][1]
        assert 2.9 <= cutoff_at < 3.5, f"cutoff {cutoff_at:.3f}s after answer, grant ended at 3s"
        balance = (await api.balance("c1")).voice
        assert (balance.free_micros, balance.reserved_micros) == (0, 0)
        assert (await call.read()) is grpc.aio.EOF


async def test_slices_are_renewed_ahead_of_need(make_server: ServerFactory) -> None:
    async with make_server(**FAST) as running:
        api = running.api
        await _one_credit_a_second(api)
        await api.client("c1", "a1", "p")
        await api.authorize("s1", "c1")
        call, first = await api.start_call("s1", "c1")
        grants = [first.grant.granted_seconds]
        while len(grants) < 3:
            grants.append((await call.read()).grant.granted_seconds)
        assert grants == [2, 4, 6]
        reserved = (await api.balance("c1")).voice.reserved_micros
        assert reserved == 6 * CREDIT
        summary = (await api.end_call(call, 5)).summary
        assert (summary.billed_seconds, summary.client_charged_micros) == (5, 5 * CREDIT)
        balance = (await api.balance("c1")).voice
        assert (balance.reserved_micros, balance.free_micros) == (0, 995 * CREDIT)


async def test_one_agency_pool_is_shared_by_concurrent_calls_of_its_clients(make_server: ServerFactory) -> None:
    async with make_server(**FAST) as running:
        api = running.api
        await _one_credit_a_second(api, agency_credits=10)
        clients = [f"c{n}" for n in range(4)]
        for client in clients:
            await api.client(client, "a1", "p")

        async def call_until_cut(client: str) -> tuple[int, int, int]:
            granted = (await api.authorize(f"s-{client}", client)).granted_seconds
            if not granted:
                return 0, 0, 0
            call, message = await api.start_call(f"s-{client}", client)
            while message.WhichOneof("msg") != "cutoff":
                if message.WhichOneof("msg") == "grant":
                    granted = message.grant.granted_seconds
                message = await call.read()
            return granted, message.cutoff.billed_seconds, message.cutoff.reason

        results = await asyncio.gather(*(call_until_cut(c) for c in clients))
        assert sum(billed for _, billed, _ in results) == 10  # exactly what the pool held
        for granted, billed, reason in results:
            assert billed == granted  # cut at the end of the grant, not a second past it
            if granted:
                assert reason == common_pb2.DENY_REASON_AGENCY_CREDITS_EXHAUSTED
        agency = (await api.balance("a1")).voice
        assert (agency.free_micros, agency.purchased_micros, agency.reserved_micros) == (0, 0, 0)
        client_total = sum([(await api.balance(c)).voice.period_used_micros for c in clients])
        assert client_total == 10 * CREDIT


async def test_a_dropped_stream_can_be_resumed_within_the_grace_period(make_server: ServerFactory) -> None:
    async with make_server(**{**FAST, "grace_seconds": 5.0}) as running:
        api = running.api
        await _one_credit_a_second(api)
        await api.client("c1", "a1", "p")
        await api.authorize("s1", "c1")
        call, _ = await api.start_call("s1", "c1")
        call.cancel()
        await asyncio.sleep(0.3)
        resumed, grant = await api.start_call("s1", "c1")
        assert grant.grant.granted_seconds >= 2
        summary = (await api.end_call(resumed, 1)).summary
        assert summary.billed_seconds == 1
        assert (await api.balance("c1")).voice.reserved_micros == 0


async def test_a_dropped_stream_not_resumed_is_settled_by_the_server(make_server: ServerFactory) -> None:
    async with make_server(**FAST) as running:
        api = running.api
        await _one_credit_a_second(api)
        await api.client("c1", "a1", "p")
        await api.authorize("s1", "c1")
        call, _ = await api.start_call("s1", "c1")
        await asyncio.sleep(0.5)
        call.cancel()
        await asyncio.sleep(1.8)  # past the 1 s grace
        balance = (await api.balance("c1")).voice
        assert balance.reserved_micros == 0
        # billed for the time the call could have run: until the grace ended (about 2 s)
        assert CREDIT <= balance.period_used_micros <= 2 * CREDIT
        _, final = await api.start_call("s1", "c1")
        assert final.cutoff.reason == common_pb2.DENY_REASON_SESSION_ABANDONED
        assert final.cutoff.billed_seconds * CREDIT == balance.period_used_micros


async def test_an_authorization_never_started_is_released(make_server: ServerFactory) -> None:
    async with make_server(**{**FAST, "authorize_ttl_seconds": 0.5}) as running:
        api = running.api
        await _one_credit_a_second(api)
        await api.client("c1", "a1", "p")
        await api.authorize("s1", "c1")
        assert (await api.balance("c1")).voice.reserved_micros == 2 * CREDIT
        await asyncio.sleep(1.0)
        balance = (await api.balance("c1")).voice
        assert (balance.reserved_micros, balance.period_used_micros) == (0, 0)


async def test_authorize_is_idempotent_by_session_id(api: Api) -> None:
    await _one_credit_a_second(api)
    await api.client("c1", "a1", "p")
    await api.client("c2", "a1", "p")
    first = await api.authorize("s1", "c1")
    again = await api.authorize("s1", "c1")
    assert (again.allowed, again.granted_seconds, again.expires_at) == (True, first.granted_seconds, first.expires_at)
    assert (await api.balance("c1")).voice.reserved_micros == 60 * CREDIT  # one slice, not two
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await api.authorize("s1", "c2")
    assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(raised.value).reason == "SESSION_ID_REUSED"


async def test_concurrency_cap_of_the_plan(api: Api) -> None:
    await _one_credit_a_second(api)
    await api.plan("a1", "one-line", free_voice_micros=100 * CREDIT, max_concurrent_sessions=1)
    await api.client("c1", "a1", "one-line")
    assert (await api.authorize("s1", "c1")).allowed
    denied = await api.authorize("s2", "c1")
    assert denied.deny_reason == common_pb2.DENY_REASON_CONCURRENCY_LIMIT_REACHED
    call, _ = await api.start_call("s1", "c1")
    await api.end_call(call, 1)
    assert (await api.authorize("s3", "c1")).allowed


async def test_suspending_a_subscription_cuts_live_calls_at_once(make_server: ServerFactory) -> None:
    async with make_server(slice_seconds=60) as running:
        api = running.api
        await _one_credit_a_second(api)
        await api.client("c1", "a1", "p")
        await api.authorize("s1", "c1")
        call, _ = await api.start_call("s1", "c1")
        await asyncio.sleep(1.2)
        before = time.monotonic()
        await api.accounts.UpdateSubscription(
            account_pb2.UpdateSubscriptionRequest(account_id="a1", inbound_active=False), metadata=api.metadata
        )
        cutoff = await call.read()
        assert time.monotonic() - before < 1.0
        assert cutoff.cutoff.reason == common_pb2.DENY_REASON_SUBSCRIPTION_INACTIVE
        assert cutoff.cutoff.billed_seconds == 2  # 1.2 s, billed per started second
        assert (await api.balance("c1")).voice.period_used_micros == 2 * CREDIT


async def test_a_top_up_lets_a_call_on_its_final_grant_go_on(make_server: ServerFactory) -> None:
    async with make_server(**{**FAST, "warning_seconds": 0.5}) as running:
        api = running.api
        await _one_credit_a_second(api, client_credits=2)
        await api.client("c1", "a1", "p")
        await api.authorize("s1", "c1")
        call, first = await api.start_call("s1", "c1")
        assert first.grant.granted_seconds == 2
        await asyncio.sleep(1.2)  # the renewal found nothing: this grant is final
        await api.topup("c1", 10 * CREDIT, "rescue")
        message = await call.read()
        while message.WhichOneof("msg") == "warning":
            message = await call.read()
        assert message.WhichOneof("msg") == "grant" and message.grant.granted_seconds == 4
        summary = (await api.end_call(call, 3)).summary
        assert summary.billed_seconds == 3


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
