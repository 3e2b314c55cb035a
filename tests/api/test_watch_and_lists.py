"""Live balances, ledger pages, events, and the standard health and reflection services."""

from __future__ import annotations

import asyncio

import pytest
from creditd_client.v1 import common_pb2, ledger_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import ALL_BACKENDS, CREDIT, Api

# The rules hold on every backend, the Redis Cluster one included.
pytestmark = pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)


async def test_watch_balance_sends_the_current_balance_then_every_change(api: Api) -> None:
    await api.agency("a1", free_voice_micros=0)
    watch = api.ledger.WatchBalance(ledger_pb2.WatchBalanceRequest(account_id="a1"), metadata=api.metadata)
    first = await asyncio.wait_for(watch.read(), 5)
    assert first.voice.available_micros == 0
    await api.topup("a1", 3 * CREDIT, "t1")
    second = await asyncio.wait_for(watch.read(), 5)
    assert second.voice.purchased_micros == 3 * CREDIT
    await api.topup("a1", 2 * CREDIT, "t2", balance_type=common_pb2.BALANCE_TYPE_SMS)
    third = await asyncio.wait_for(watch.read(), 5)
    assert (third.voice.purchased_micros, third.sms.purchased_micros) == (3 * CREDIT, 2 * CREDIT)
    watch.cancel()


async def test_watch_events_streams_top_ups_as_they_happen(api: Api) -> None:
    await api.agency("a1")
    watch = api.ledger.WatchEvents(ledger_pb2.WatchEventsRequest(account_id="a1"), metadata=api.metadata)
    await asyncio.sleep(0.2)  # the watch is registered before the top-up
    await api.topup("a1", CREDIT, "t1")
    event = (await asyncio.wait_for(watch.read(), 5)).event
    assert (event.type, event.amount_micros, event.idempotency_key) == (
        ledger_pb2.EVENT_TYPE_TOPUP_APPLIED,
        CREDIT,
        "t1",
    )
    watch.cancel()


async def test_ledger_entries_page_newest_first(api: Api) -> None:
    await api.agency("a1", free_voice_micros=0, free_sms_micros=0)
    for n in range(5):
        await api.topup("a1", (n + 1) * CREDIT, f"t{n}")
    seen: list[int] = []
    token = ""
    while True:
        page = await api.ledger.ListLedgerEntries(
            ledger_pb2.ListLedgerEntriesRequest(account_id="a1", page_size=2, page_token=token), metadata=api.metadata
        )
        seen += [e.purchased_micros for e in page.entries]
        token = page.next_page_token
        if not token:
            break
    assert seen == [5 * CREDIT, 4 * CREDIT, 3 * CREDIT, 2 * CREDIT, CREDIT]


async def test_health_and_reflection(api: Api) -> None:
    health = health_pb2_grpc.HealthStub(api.channel)
    for service in ("", "creditd.v1.MeteringService", "creditd.v1.LedgerService", "creditd.v1.AccountService"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(api.channel)
    call = reflection.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    names = {s.name for s in response.list_services_response.service}
    assert {"creditd.v1.MeteringService", "creditd.v1.LedgerService", "creditd.v1.AccountService"} <= names
    await call.done_writing()
