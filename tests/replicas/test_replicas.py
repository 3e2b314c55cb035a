"""Two replicas (two in-process servers sharing one Redis prefix and one Postgres database)
serving the calls of one agency at the same time.

The replicas run on a ManualClock (one shared, as in test_portable_sessions.py; the test
of a lost Redis gives each replica its own, moved together, so that their health monitors
race): a test moves time itself, so renewals, warnings, cutoffs and health checks on both
replicas come at the second they are due however busy the machine is. What travels
between the replicas (a change made on one that the other hears of through the bus) takes
real time: a test polls for it with a generous deadline, and checks that it came without
the clock having moved.
"""

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
from creditd.domain.records import DenyReason
from creditd.engine import durability
from creditd.engine.clock import ManualClock
from creditd.engine.context import Context
from creditd.engine.health import Monitor
from tests import services
from tests.calls import WAIT_SECONDS, Call, session, until
from tests.conftest import ADMIN_TOKEN, CREDIT, Api, Running, ServerFactory
from tests.crash.procs import Ledger, RedisServer

FAST: dict[str, Any] = {
    "slice_seconds": 3,
    "renewal_lead_seconds": 1.0,
    "warning_seconds": 1.0,
    "grace_seconds": 2.0,
    "authorize_ttl_seconds": 5.0,
}
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
PER_SECOND = 60 * CREDIT  # a rate of one credit a second: whole micros for every second


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


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


async def _answered(api: Api, session_id: str, client_id: str) -> Call:
    """A call authorized and answered on the replica behind `api`."""
    assert (await api.authorize(session_id, client_id)).allowed
    call = Call(api)
    assert (await call.start(session_id, client_id)).WhichOneof("msg") == "grant"
    return call


def _granted(call: Call) -> int:
    return max(m.grant.granted_seconds for m in call.messages if m.WhichOneof("msg") == "grant")


async def _consistent(app: App) -> None:
    await app.flusher.flush()
    assert await durability.reconcile(app.ctx) == []


async def test_the_agency_pool_is_never_overspent_across_replicas(
    make_server: ServerFactory, clock: ManualClock
) -> None:
    pool = 40
    async with make_server(clock=clock, **FAST) as r1, make_server(clock=clock, **FAST) as r2:
        clients = await _agency(r1.api, pool_credits=pool, client_credits=1000, clients=4)
        served = {f"pool-{i}": (r1 if i % 2 else r2) for i in range(10)}
        answered = [
            _answered(server.api, sid, clients[i % len(clients)]) for i, (sid, server) in enumerate(served.items())
        ]
        calls = dict(zip(served, await asyncio.gather(*answered), strict=True))  # both replicas at once
        answered_at = clock.now()
        warned_at: dict[str, float] = {}
        cut_at: dict[str, float] = {}
        while len(cut_at) < len(calls):  # a quarter second at a time, noting when each call is warned and cut
            assert clock.now() - answered_at < pool, f"calls still live: {set(calls) - set(cut_at)}"
            await clock.advance(0.25)
            for session_id, server in served.items():
                live = session(server, session_id)
                if live is not None and live.warned:
                    warned_at.setdefault(session_id, clock.now() - answered_at)
                if session_id not in cut_at and live is None:
                    cut_at[session_id] = clock.now() - answered_at
        billed = {}
        for session_id, call in calls.items():
            assert (await call.next("warning")).warning.remaining_seconds == 1
            cutoff = (await call.next("cutoff")).cutoff  # every grant came before it on the stream
            assert cutoff.reason == common_pb2.DENY_REASON_AGENCY_CREDITS_EXHAUSTED
            assert cutoff.billed_seconds == _granted(call), session_id  # never a second beyond the grant
            assert warned_at[session_id] == _granted(call) - 1, session_id  # warned 1 s before the end
            assert cut_at[session_id] == _granted(call), session_id  # cut at the exact end of its grant
            billed[session_id] = cutoff.billed_seconds
        agency = (await r2.api.balance("a1")).voice
        await _consistent(r1.app)
    # everything the pool held was delivered, and not a second more
    assert sum(billed.values()) == pool
    assert (agency.free_micros, agency.purchased_micros, agency.reserved_micros, agency.available_micros) == (
        0,
        0,
        0,
        0,
    )


async def test_a_subscription_switched_off_on_one_replica_cuts_calls_on_the_other(
    make_server: ServerFactory, clock: ManualClock
) -> None:
    async with make_server(clock=clock, **FAST) as r1, make_server(clock=clock, **FAST) as r2:
        await _agency(r1.api, pool_credits=300, client_credits=100, clients=2)
        on_c1 = [await _answered(r2.api, f"sub-{i}", "c1") for i in range(3)]
        other = await _answered(r2.api, "other-client", "c2")
        await clock.advance(0.5)
        await r1.api.accounts.UpdateSubscription(
            account_pb2.UpdateSubscriptionRequest(account_id="c1", inbound_active=False),
            metadata=r1.api.metadata,
        )
        # The clock stands still: the cutoffs come from replica 2 hearing of the change, not
        # from a renewal that would find the subscription off at the end of the grant.
        for call in on_c1:
            cutoff = (await call.next("cutoff")).cutoff
            assert (cutoff.reason, cutoff.billed_seconds) == (common_pb2.DENY_REASON_SUBSCRIPTION_INACTIVE, 1)
        live = session(r2, "other-client")
        assert live is not None and live.final is None and other.pending() == []  # another client's call goes on
        assert (await other.end(1)).summary.billed_seconds == 1
        await _consistent(r2.app)


async def test_a_topup_on_one_replica_renews_a_final_grant_on_the_other(
    make_server: ServerFactory, clock: ManualClock
) -> None:
    async with make_server(clock=clock, **FAST) as r1, make_server(clock=clock, **FAST) as r2:
        await _agency(r1.api, pool_credits=300, client_credits=4, clients=1)  # c1 can pay 4 s
        call = await _answered(r2.api, "final-grant", "c1")
        await clock.advance(2)  # the renewal of the 3 s slice finds the last second c1 can pay
        assert (await call.next()).grant.granted_seconds == 4  # final: a warning at 3 s, a cutoff at 4 s
        await r1.api.topup("c1", 60 * CREDIT, "webhook-1")
        live = session(r2, "final-grant")
        assert live is not None
        await until(lambda: live.exhausted is DenyReason.NONE, "replica 2 heard of the top-up")
        await clock.advance(0.75)
        assert call.pending() == []
        await clock.advance(0.25)  # 3 s: the renewal point, 1 s before the old final grant ends
        assert (await call.next()).grant.granted_seconds == 7
        await clock.advance(1.5)  # past 4 s, where the old final grant ended: no warning, no cutoff
        assert call.pending() == [] and session(r2, "final-grant") is not None
        summary = (await call.end(5)).summary
        assert (summary.billed_seconds, summary.client_charged_micros) == (5, 5 * CREDIT)
        await _consistent(r1.app)


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
    make_server: ServerFactory, backend: dict[str, str], monkeypatch: pytest.MonkeyPatch, clock: ManualClock
) -> None:
    async with make_server(clock=clock, **FAST) as first:
        session_ids = await _open_sessions(first, 6)
        await first.app.metering.close()  # a crash: nothing settles its sessions on the way out
    services.delete_redis_keys(backend["redis_prefix"])  # Redis lost everything
    rebuilds = _count_rebuilds(monkeypatch)
    settings = {"listen": "127.0.0.1:0", "admin_token": ADMIN_TOKEN, "flush_interval_seconds": 0.05, **backend, **FAST}
    replicas = [App(Settings(**settings), clock) for _ in range(2)]
    await asyncio.gather(*(app.start() for app in replicas))  # both find Redis empty at once
    try:
        await clock.advance(2)  # both health monitors look at the store, twice
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
    make_server: ServerFactory, backend: dict[str, str], monkeypatch: pytest.MonkeyPatch, clock: ManualClock
) -> None:
    # A clock for each replica, at the same time and moved together: their health monitors
    # look at the store at the same moment and race to rebuild it (on one shared clock, the
    # first would rebuild before the second looked, and the race would never be run).
    clocks = (clock, ManualClock(clock.now()))

    async def advance(seconds: float) -> None:
        await asyncio.gather(*(c.advance(seconds) for c in clocks))

    redis = RedisServer()  # of our own, so that losing its data is one atomic event
    redis.start()
    try:
        async with (
            make_server(clock=clocks[0], redis_url=redis.url, **FAST) as r1,
            make_server(clock=clocks[1], redis_url=redis.url, **FAST) as r2,
        ):
            session_ids = await _open_sessions(r1, 4)
            served = {f"live-{i}": server for i, server in enumerate((r1, r2, r2))}
            live = {session_id: await _answered(server.api, session_id, "c1") for session_id, server in served.items()}
            await advance(2)  # renewed once (the next renewal is due at 5 s)
            for call in live.values():
                assert (await call.next()).grant.granted_seconds == 6
            await r1.app.flusher.flush()
            await r2.app.flusher.flush()  # the database knows every session as open
            rebuilds = _count_rebuilds(monkeypatch)
            redis.kill()
            await advance(1)  # 3 s: the health monitors find the store down
            assert [r.app.ctx.status.store_ok for r in (r1, r2)] == [False, False]
            redis.start()  # the same port, empty
            assert rebuilds == [] and all(call.pending() == [] for call in live.values())
            await advance(1)  # 4 s: both find it empty at once, cut their calls, and one of them rebuilds it
            for call in live.values():
                cutoff = (await call.next()).cutoff
                assert (cutoff.reason, cutoff.billed_seconds) == (common_pb2.DENY_REASON_SERVICE_UNAVAILABLE, 4)
            assert len(rebuilds) == 1, rebuilds
            await advance(2)  # they look again, twice; the lost sessions' settlements are retried
            assert len(rebuilds) == 1, rebuilds
            assert all(session(server, session_id) is None for session_id, server in served.items())
            for i, server in enumerate((r1, r2)):  # both serve again
                after = await _answered(server.api, f"after-{i}", "c2")
                assert (await after.end(1)).summary.billed_seconds == 1
            await r1.app.flusher.flush()
            await r2.app.flusher.flush()
            _settled_once(backend["database_url"], session_ids + list(live))
            await _consistent(r2.app)
    finally:
        redis.close()


async def _readiness(api: Api) -> int:
    reply = await health_pb2_grpc.HealthStub(api.channel).Check(
        health_pb2.HealthCheckRequest(service="creditd.v1.LedgerService"), timeout=2
    )
    return int(reply.status)


async def _until_readiness(api: Api, want: int, within: float = WAIT_SECONDS) -> None:
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
