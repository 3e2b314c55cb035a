"""Two replicas (two in-process servers sharing one Redis prefix and one Postgres database)
serving the calls of one agency at the same time."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from creditd_client.v1 import account_pb2, common_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from creditd.app import App
from creditd.config import Settings
from creditd.engine import durability
from creditd.engine.context import Context
from creditd.engine.health import Monitor
from tests import services
from tests.conftest import ADMIN_TOKEN, CREDIT, Api, Running, ServerFactory
from tests.crash.procs import Ledger, RedisServer
from tests.crash.workload import LiveCall

FAST: dict[str, Any] = {
    "slice_seconds": 3,
    "renewal_lead_seconds": 1.0,
    "warning_seconds": 1.0,
    "grace_seconds": 2.0,
    "authorize_ttl_seconds": 5.0,
}
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
PER_SECOND = 60 * CREDIT  # a rate of one credit a second: whole micros for every second


async def _agency(api: Api, pool_credits: int, client_credits: int, clients: int) -> list[str]:
    """An agency whose pool pays one credit a second, and REBILLING clients on one plan."""
    await api.agency("a1", free_voice_micros=pool_credits * CREDIT, default_voice_micros_per_minute=PER_SECOND)
    await api.plan("a1", "p", free_voice_micros=0, default_voice_micros_per_minute=PER_SECOND)
    names = [f"c{i}" for i in range(1, clients + 1)]
    for name in names:
        await api.client(name, "a1", "p")
        if client_credits:
            await api.topup(name, client_credits * CREDIT, f"seed-{name}")
    return names


async def _consistent(app: App) -> None:
    await app.flusher.flush()
    assert await durability.reconcile(app.ctx) == []


async def test_the_agency_pool_is_never_overspent_across_replicas(make_server: ServerFactory) -> None:
    pool = 40
    async with make_server(**FAST) as r1, make_server(**FAST) as r2:
        clients = await _agency(r1.api, pool_credits=pool, client_credits=1000, clients=4)
        calls = [
            LiveCall((r1 if i % 2 else r2).api, f"pool-{i}", clients[i % len(clients)], report_every=1.0)
            for i in range(10)
        ]
        await asyncio.gather(*(call.open() for call in calls))
        for call in calls:
            await call.wait(pool + 10)
        agency = (await r2.api.balance("a1")).voice
        await _consistent(r1.app)
    billed = {call.session_id: call.final.cutoff.billed_seconds for call in calls if call.final}
    assert len(billed) == len(calls), [(c.session_id, c.final, c.error) for c in calls]
    for call in calls:
        assert call.final is not None and call.final.WhichOneof("msg") == "cutoff", call.final
        assert call.final.cutoff.reason == common_pb2.DENY_REASON_AGENCY_CREDITS_EXHAUSTED
        assert billed[call.session_id] <= call.granted  # never a second beyond the grant
    # everything the pool held was delivered, and not a second more
    assert sum(billed.values()) == pool
    assert (agency.free_micros, agency.purchased_micros, agency.reserved_micros, agency.available_micros) == (
        0,
        0,
        0,
        0,
    )


async def test_a_subscription_switched_off_on_one_replica_cuts_calls_on_the_other(
    make_server: ServerFactory,
) -> None:
    async with make_server(**FAST) as r1, make_server(**FAST) as r2:
        await _agency(r1.api, pool_credits=300, client_credits=100, clients=2)
        on_c1 = [LiveCall(r2.api, f"sub-{i}", "c1") for i in range(3)]
        other = LiveCall(r2.api, "other-client", "c2")
        await asyncio.gather(*(call.open() for call in (*on_c1, other)))
        await asyncio.sleep(0.5)
        await r1.api.accounts.UpdateSubscription(
            account_pb2.UpdateSubscriptionRequest(account_id="c1", inbound_active=False),
            metadata=r1.api.metadata,
        )
        switched = time.monotonic()
        for call in on_c1:
            await call.wait(3)
        delays = []
        for call in on_c1:
            assert call.final is not None and call.final_at is not None, call.session_id
            assert call.final.cutoff.reason == common_pb2.DENY_REASON_SUBSCRIPTION_INACTIVE
            delays.append(call.final_at - switched)
        assert max(delays) < 1.0, delays
        assert not other.done  # another client's call goes on
        await other.end()
        await _consistent(r2.app)
    print(f"\nsubscription off on replica 1 -> cutoff on replica 2 after {max(delays) * 1000:.0f} ms (max of 3)")


async def test_a_topup_on_one_replica_renews_a_final_grant_on_the_other(make_server: ServerFactory) -> None:
    async with make_server(**FAST) as r1, make_server(**FAST) as r2:
        await _agency(r1.api, pool_credits=300, client_credits=4, clients=1)  # c1 can pay 4 s
        call = LiveCall(r2.api, "final-grant", "c1")
        await call.open()
        deadline = time.monotonic() + 5
        while call.granted < 4:  # the 3 s slice, then the last second c1 can pay: final
            assert time.monotonic() < deadline and not call.done, call.grants
            await asyncio.sleep(0.05)
        assert call.granted == 4
        end_of_final_grant = call.started + 4
        await r1.api.topup("c1", 60 * CREDIT, "webhook-1")
        paid = time.monotonic()
        while call.granted <= 4:
            assert not call.done, call.final  # no cutoff at the end of the old final grant
            assert time.monotonic() < end_of_final_grant + 0.5, "the call never renewed"
            await asyncio.sleep(0.02)
        renewed = time.monotonic()
        assert renewed < end_of_final_grant
        await asyncio.sleep(max(0.0, end_of_final_grant + 0.5 - time.monotonic()))
        assert not call.done
        await call.end()
        assert call.final is not None and call.final.WhichOneof("msg") == "summary", call.final
        assert call.final.summary.billed_seconds >= 4
        await _consistent(r1.app)
    print(
        f"\ntop-up on replica 1 -> new grant on replica 2 {(renewed - paid) * 1000:.0f} ms later (at the renewal"
        f" point), {(end_of_final_grant - renewed) * 1000:.0f} ms before the old final grant would have ended"
    )


def _count_rebuilds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count every rebuild that replicas of this process run (start-up and lost store)."""
    calls: list[str] = []
    original: Callable[[Context], Awaitable[int]] = durability.rebuild

    async def counting(ctx: Context) -> int:
        calls.append(ctx.settings.listen)
        return await original(ctx)

    monkeypatch.setattr("creditd.app.rebuild", counting)
    return calls


async def _open_sessions(server: Running, count: int) -> list[str]:
    """Sessions that the database knows as open: authorized, some of them answered."""
    api = server.api
    await _agency(api, pool_credits=300, client_credits=50, clients=2)
    ids = []
    for i in range(count):
        session_id = f"open-{i}"
        answer = await api.authorize(session_id, "c1" if i % 2 else "c2")
        assert answer.allowed
        if i % 2:
            await api.start_call(session_id, "c1")
        ids.append(session_id)
    await asyncio.sleep(0.3)
    await server.app.flusher.flush()
    return ids


def _settled_once(database_url: str, session_ids: list[str]) -> None:
    ledger = Ledger(database_url)
    sessions = ledger.sessions()
    per_payer = Counter((u.session_id, u.account_id) for u in ledger.voice_usage())
    for session_id in session_ids:
        assert sessions[session_id][0] == "settled", session_id
        payers = [key for key in per_payer if key[0] == session_id]
        assert len(payers) == 2, payers  # the client and the agency
        assert all(per_payer[key] == 1 for key in payers), per_payer


async def test_two_replicas_starting_on_an_empty_redis_rebuild_it_once(
    make_server: ServerFactory, backend: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_server(**FAST) as first:
        session_ids = await _open_sessions(first, 6)
        await first.app.metering.close()  # a crash: nothing settles its sessions on the way out
    services.delete_redis_keys(backend["redis_prefix"])  # Redis lost everything
    rebuilds = _count_rebuilds(monkeypatch)
    settings = {"listen": "127.0.0.1:0", "admin_token": ADMIN_TOKEN, "flush_interval_seconds": 0.05, **backend, **FAST}
    replicas = [App(Settings(**settings)) for _ in range(2)]
    await asyncio.gather(*(app.start() for app in replicas))
    try:
        await asyncio.sleep(1.5)  # both health monitors look at the store at least once
        assert len(rebuilds) == 1, rebuilds
        for app in replicas:
            assert await app.ctx.store.ping() is True
            await app.flusher.flush()
        _settled_once(backend["database_url"], session_ids)
        await _consistent(replicas[0])
    finally:
        for app in replicas:
            await app.stop(grace=0)


async def test_two_running_replicas_rebuild_a_lost_redis_once(
    make_server: ServerFactory, backend: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    redis = RedisServer()  # of our own, so that losing its data is one atomic event
    redis.start()
    try:
        async with make_server(redis_url=redis.url, **FAST) as r1, make_server(redis_url=redis.url, **FAST) as r2:
            session_ids = await _open_sessions(r1, 4)
            live = [LiveCall(api, f"live-{i}", "c1") for i, api in enumerate((r1.api, r2.api, r2.api))]
            await asyncio.gather(*(call.open() for call in live))
            await asyncio.sleep(0.3)
            rebuilds = _count_rebuilds(monkeypatch)
            redis.kill()
            redis.start()  # the same port, empty
            for call in live:
                await call.wait(8)
                assert call.final is not None, (call.session_id, call.error)
                assert call.final.cutoff.reason == common_pb2.DENY_REASON_SERVICE_UNAVAILABLE
            await asyncio.sleep(1.2)
            assert len(rebuilds) == 1, rebuilds
            for i, server in enumerate((r1, r2)):  # both serve again
                after = LiveCall(server.api, f"after-{i}", "c2")
                await after.open()
                await after.end()
                assert after.final is not None and after.final.WhichOneof("msg") == "summary"
            await r1.app.flusher.flush()
            await r2.app.flusher.flush()
            _settled_once(backend["database_url"], session_ids + [call.session_id for call in live])
            await _consistent(r2.app)
    finally:
        redis.close()


async def _readiness(api: Api) -> int:
    reply = await health_pb2_grpc.HealthStub(api.channel).Check(
        health_pb2.HealthCheckRequest(service="creditd.v1.LedgerService"), timeout=2
    )
    return int(reply.status)


async def _until_readiness(api: Api, want: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while await _readiness(api) != want:
        assert time.monotonic() < deadline, f"readiness never became {want}"
        await asyncio.sleep(0.02)


async def test_a_replica_that_finds_the_loss_and_one_that_is_told_are_not_ready_until_the_rebuild_ends(
    make_server: ServerFactory, backend: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No periodic health checks here: only what wakes a replica's monitor. Replica 1 finds
    the loss by an operation and rebuilds; replica 2, with no traffic, hears of it from
    replica 1 (bus) and waits. Both are NOT_SERVING, and answer UNAVAILABLE, until the
    rebuild (held open by the test) ends."""
    monkeypatch.setattr(Monitor, "start", lambda self: None)
    redis = RedisServer()  # of our own, so that losing its data is one atomic event
    redis.start()
    try:
        async with make_server(redis_url=redis.url, **FAST) as r1, make_server(redis_url=redis.url, **FAST) as r2:
            await _agency(r1.api, pool_credits=10, client_credits=5, clients=1)
            held, release = asyncio.Event(), asyncio.Event()
            original: Callable[..., Awaitable[int]] = durability.rebuild

            async def held_rebuild(ctx: Context, agencies: Any = None) -> int:
                held.set()
                await release.wait()
                return await original(ctx, agencies)

            monkeypatch.setattr("creditd.app.rebuild", held_rebuild)
            client = redis.client()
            try:
                client.flushall()  # Redis lost everything
            finally:
                client.close()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await r1.api.balance("c1")
            assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
            await asyncio.wait_for(held.wait(), 10)  # replica 1 rebuilds
            await _until_readiness(r1.api, NOT_SERVING)
            await _until_readiness(r2.api, NOT_SERVING)  # told by replica 1, before the rebuild ends
            for api in (r1.api, r2.api):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await api.balance("c1")
                assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await api.topup("c1", CREDIT, "during-the-rebuild")
                assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
            assert await _readiness(r2.api) == NOT_SERVING  # still: the rebuild has not ended
            release.set()
            await _until_readiness(r1.api, SERVING)
            await _until_readiness(r2.api, SERVING)
            for api in (r1.api, r2.api):
                assert (await api.balance("c1")).voice.purchased_micros == 5 * CREDIT
            assert "during-the-rebuild" not in Ledger(backend["database_url"]).topup_keys()  # refused, not committed
            await _consistent(r2.app)
    finally:
        redis.close()
