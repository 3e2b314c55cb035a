"""Top-ups, balances, ledger paging, watches and typed errors, with both clients, on a real server."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from conftest import ADMIN_TOKEN, CREDIT, Setup, unique

import creditd_client
from creditd_client import (
    AlreadyExists,
    Balances,
    CreditdError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    aio,
)
from creditd_client.v1 import ledger_pb2
from tests.conftest import Running


async def test_topup_is_idempotent_by_key_and_a_reused_key_is_a_typed_error(client: aio.Client, setup: Setup) -> None:
    key = unique("payment")
    first = await client.topup(setup.client_id, 12 * CREDIT, key, external_ref="pi_123")
    again = await client.topup(setup.client_id, 12 * CREDIT, key, external_ref="pi_123")  # a retried webhook
    assert again.entry_id == first.entry_id
    assert first.balance.purchased_micros == 12 * CREDIT
    assert (await client.get_balance(setup.client_id)).voice.available_micros == 12 * CREDIT

    with pytest.raises(FailedPrecondition) as reused:
        await client.topup(setup.client_id, 13 * CREDIT, key)
    error = reused.value
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "IDEMPOTENCY_KEY_REUSED"
    assert error.attempts == 1  # not retried: only UNAVAILABLE is
    assert isinstance(error, CreditdError)


async def test_errors_are_typed_from_their_error_info(client: aio.Client, setup: Setup, fast_server: Running) -> None:
    with pytest.raises(NotFound) as missing:
        await client.get_balance("no-such-account")
    assert missing.value.code is grpc.StatusCode.NOT_FOUND
    assert missing.value.reason == "ACCOUNT_NOT_FOUND"
    assert missing.value.metadata == {"account_id": "no-such-account"}
    assert "does not exist" in missing.value.message

    with pytest.raises(AlreadyExists):
        await client.create_agency(setup.agency_id)
    with pytest.raises(InvalidArgument) as invalid:
        await client.topup(setup.client_id, 0, unique("k"))
    assert invalid.value.metadata["field"] == "amount_micros"

    worker = await client.create_api_key("worker", setup.agency_id)
    async with aio.Client(fast_server.app.address, worker.secret) as as_worker:
        assert (await as_worker.get_balance(setup.client_id)).account_id == setup.client_id
        with pytest.raises(PermissionDenied):
            await as_worker.topup(setup.client_id, CREDIT, unique("k"))
    await client.revoke_api_key(worker.key_id)
    async with aio.Client(fast_server.app.address, worker.secret) as revoked:
        with pytest.raises(Unauthenticated):
            await revoked.get_balance(setup.client_id)


async def test_watch_balance_sees_a_top_up(client: aio.Client, setup: Setup) -> None:
    async with client.watch_balance(setup.client_id) as watch:
        current = await anext(watch)
        assert current.voice.available_micros == 0
        await client.topup(setup.client_id, 5 * CREDIT, unique("pay"))
        changed = await asyncio.wait_for(anext(watch), 5)
        assert isinstance(changed, Balances) and changed.voice.available_micros == 5 * CREDIT


async def test_watch_events_sees_a_top_up(client: aio.Client, setup: Setup) -> None:
    async with client.watch_events(setup.client_id) as watch:
        waiting = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.2)
        await client.topup(setup.client_id, 5 * CREDIT, unique("pay"))
        event = await asyncio.wait_for(waiting, 5)
    assert event.type == "EVENT_TYPE_TOPUP_APPLIED" and event.amount_micros == 5 * CREDIT


async def test_list_ledger_entries_pages_through_the_whole_history(client: aio.Client, setup: Setup) -> None:
    keys = [unique(f"pay{n}") for n in range(7)]
    for n, key in enumerate(keys):
        await client.topup(setup.client_id, (n + 1) * CREDIT, key)
    pages: list[int] = []
    real_run = client._run

    async def counting(call, timeout=None):  # type: ignore[no-untyped-def]
        if call.method == "ListLedgerEntries":
            pages.append(call.request.page_size)
        return await real_run(call, timeout)

    client._run = counting  # type: ignore[method-assign]
    try:
        entries = [e async for e in client.list_ledger_entries(setup.client_id, balance_type="voice", page_size=3)]
    finally:
        del client._run
    topups = [e for e in entries if e.kind == ledger_pb2.LEDGER_ENTRY_KIND_TOPUP]
    assert [e.idempotency_key for e in topups] == list(reversed(keys))  # newest first, none lost or repeated
    assert len(pages) >= 3
    events = [e async for e in client.list_events(setup.client_id, page_size=2)]
    assert len([e for e in events if e.type == "EVENT_TYPE_TOPUP_APPLIED"]) == 7


async def test_account_admin_calls(client: aio.Client, setup: Setup) -> None:
    plan = await client.update_plan(setup.agency_id, setup.plan_id, usage_limit_micros=50 * CREDIT)
    assert plan.usage_limit_micros == 50 * CREDIT and plan.default_voice_micros_per_minute == 60 * CREDIT
    assert (await client.get_plan(setup.agency_id, setup.plan_id)) == plan
    account = await client.set_auto_refill(
        setup.client_id, "voice", threshold_micros=2 * CREDIT, amount_micros=10 * CREDIT, max_refills_per_period=2
    )
    assert account.balance_settings[0].auto_refill.amount_micros == 10 * CREDIT
    account = await client.set_low_balance_warning(setup.client_id, "sms", 100_000)
    assert any(s.low_balance_threshold_micros == 100_000 for s in account.balance_settings)
    account = await client.update_subscription(setup.client_id, inbound_active=False)
    assert not account.inbound_active and account.outbound_active
    assert (await client.get_account(setup.client_id)).inbound_active is False
    trial = await client.create_agency(unique("trial"), free_voice_micros=0)  # 0 is a real override
    assert trial.free_voice_micros == 0 and trial.free_sms_micros == 83 * CREDIT
    reader = await client.create_api_key("reader", setup.client_id, description="dashboard")
    listed = await client.list_api_keys(setup.client_id)
    assert [k.key_id for k in listed] == [reader.key_id]


async def test_the_sync_client_does_the_same(fast_server: Running, setup: Setup) -> None:
    def scenario() -> None:
        with creditd_client.Client(fast_server.app.address, ADMIN_TOKEN) as sync:
            key = unique("pay")
            first = sync.topup(setup.client_id, 2 * CREDIT, key, balance_type="sms", kind="grant")
            assert sync.topup(setup.client_id, 2 * CREDIT, key, balance_type="sms", kind="grant") == first
            assert first.balance.free_micros == 2 * CREDIT
            with pytest.raises(NotFound) as missing:
                sync.get_balance("nope")
            assert missing.value.reason == "ACCOUNT_NOT_FOUND"
            for n in range(4):
                sync.topup(setup.client_id, CREDIT, unique(f"k{n}"))
            entries = list(sync.list_ledger_entries(setup.client_id, page_size=2))
            assert len([e for e in entries if e.kind == ledger_pb2.LEDGER_ENTRY_KIND_TOPUP]) == 5
            assert sum(1 for _ in sync.list_events(setup.client_id, page_size=2)) >= 5
            with sync.watch_balance(setup.client_id) as watch:
                before = next(watch)
                sync.topup(setup.client_id, CREDIT, unique("pay"))
                after = next(watch)
            assert after.voice.available_micros == before.voice.available_micros + CREDIT
            authorization = sync.authorize(unique("call"), setup.client_id)
            assert authorization.allowed and authorization.granted_seconds == 2

    await asyncio.to_thread(scenario)


async def test_a_refill_request_is_paid_once_with_its_own_key(client: aio.Client, setup: Setup) -> None:
    await client.topup(setup.client_id, CREDIT, unique("pay"), balance_type="sms")
    await client.set_auto_refill(
        setup.client_id, "sms", threshold_micros=CREDIT // 2, amount_micros=2 * CREDIT, max_refills_per_period=1
    )
    async with client.watch_events(setup.client_id) as watch:
        async with await client.sms_sender(setup.client_id) as sender:
            for n in range(4):  # 4 x 0.166 takes the balance below 0.5
                assert (await sender.send(f"m{n}", "US")).allowed
        request = await asyncio.wait_for(anext(watch), 5)
        while request.type != "EVENT_TYPE_REFILL_REQUESTED":
            request = await asyncio.wait_for(anext(watch), 5)
    assert request.amount_micros == 2 * CREDIT and request.idempotency_key

    # What the payment side does once it has charged the card; a retried webhook does it again.
    for _ in range(2):
        paid = await client.topup(
            request.account_id,
            request.amount_micros,
            request.idempotency_key,
            balance_type=request.balance_type,
            kind="auto_refill",
        )
    assert paid.balance.available_micros == CREDIT - 4 * 166_000 + 2 * CREDIT
