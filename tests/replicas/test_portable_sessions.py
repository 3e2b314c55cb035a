"""Any replica serves any call (SPEC §6): two in-process replicas on one Redis and one
Postgres, driven by one manual clock, so every deadline is checked to the second."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from creditd_client.v1 import common_pb2

from creditd.engine import durability
from creditd.engine.clock import ManualClock
from tests.calls import Call, session
from tests.conftest import CREDIT, Running, ServerFactory
from tests.crash.procs import Ledger

pytestmark = pytest.mark.parametrize("backend", ["redis+postgres"], indirect=True)
PER_SECOND = 60 * CREDIT


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def replicas(make_server: ServerFactory, clock: ManualClock) -> AsyncIterator[tuple[Running, Running]]:
    async with make_server(clock=clock) as r1, make_server(clock=clock) as r2:
        api = r1.api
        await api.agency("a1", free_voice_micros=10_000 * CREDIT, default_voice_micros_per_minute=PER_SECOND)
        await api.plan("a1", "p", free_voice_micros=10_000 * CREDIT, default_voice_micros_per_minute=PER_SECOND)
        await api.client("c1", "a1", "p")
        yield r1, r2


async def _used_and_reserved(running: Running) -> tuple[int, int]:
    voice = (await running.api.balance("c1")).voice
    return voice.period_used_micros, voice.reserved_micros


async def test_a_call_authorized_on_one_replica_is_served_by_the_other(
    replicas: tuple[Running, Running], clock: ManualClock
) -> None:
    r1, r2 = replicas
    assert (await r1.api.authorize("s1", "c1")).granted_seconds == 60
    call = Call(r2.api)
    assert (await call.start("s1", "c1")).grant.granted_seconds == 60
    await clock.advance(45)  # renewed by the replica that serves the stream
    assert (await call.next()).grant.granted_seconds == 120
    await clock.advance(30)  # past the authorization's expiry on the first replica: it lets go
    assert session(r1, "s1") is None and session(r2, "s1") is not None
    summary = (await call.end(80)).summary
    assert summary.billed_seconds == 80
    assert await _used_and_reserved(r1) == (80 * CREDIT, 0)
    await r2.app.flusher.flush()
    assert await durability.reconcile(r1.app.ctx) == []


async def test_a_worker_resumes_on_another_replica_and_the_first_can_no_longer_renew_or_settle(
    replicas: tuple[Running, Running], clock: ManualClock
) -> None:
    r1, r2 = replicas
    await r1.api.authorize("s1", "c1")
    first = Call(r1.api)
    grant = (await first.start("s1", "c1")).grant
    await clock.advance(20)
    # The worker moves (its load balancer sent it elsewhere) while the first stream is open.
    moved = Call(r2.api)
    resumed = (await moved.start("s1", "c1")).grant
    assert (resumed.granted_seconds, resumed.expires_at) == (grant.granted_seconds, grant.expires_at)
    await clock.advance(25)  # 45 s: both replicas' timers say renew; only the new owner can
    assert (await moved.next()).grant.granted_seconds == 120
    error = await first.ended()
    assert error is not None and error.code().name == "FAILED_PRECONDITION"
    assert "resumed on another stream" in (error.details() or "")
    assert session(r1, "s1") is None
    assert await _used_and_reserved(r2) == (0, 120 * CREDIT)  # one renewal, not two
    summary = (await moved.end(100)).summary
    assert (summary.billed_seconds, summary.client_charged_micros) == (100, 100 * CREDIT)
    assert await _used_and_reserved(r1) == (100 * CREDIT, 0)
    await r1.app.flusher.flush()
    await r2.app.flusher.flush()
    assert await durability.reconcile(r2.app.ctx) == []


async def test_a_resumed_call_is_cut_by_its_new_owner_at_the_end_of_the_last_grant(
    make_server: ServerFactory, clock: ManualClock
) -> None:
    async with make_server(clock=clock) as r1, make_server(clock=clock) as r2:
        api = r1.api
        await api.agency("a1", free_voice_micros=10_000 * CREDIT, default_voice_micros_per_minute=PER_SECOND)
        await api.plan("a1", "p", free_voice_micros=75 * CREDIT, default_voice_micros_per_minute=PER_SECOND)
        await api.client("c1", "a1", "p")
        await api.authorize("s1", "c1")
        first = Call(r1.api)
        await first.start("s1", "c1")
        await clock.advance(10)
        first.cancel()  # the first replica's worker connection breaks
        moved = Call(r2.api)
        await moved.start("s1", "c1")
        await clock.advance(35)  # 45 s: the renewal finds only 15 s more
        assert (await moved.next()).grant.granted_seconds == 75
        await clock.advance(20)
        assert (await moved.next()).warning.remaining_seconds == 10
        await clock.advance(9.75)
        assert moved.pending() == []
        await clock.advance(0.25)
        cutoff = (await moved.next()).cutoff
        assert (cutoff.reason, cutoff.billed_seconds) == (common_pb2.DENY_REASON_CLIENT_CREDITS_EXHAUSTED, 75)
        assert await _used_and_reserved(r1) == (75 * CREDIT, 0)


async def test_repeated_authorize_answers_the_same_on_every_replica(
    replicas: tuple[Running, Running], clock: ManualClock
) -> None:
    r1, r2 = replicas
    first = await r1.api.authorize("s1", "c1")
    await clock.advance(7)
    answers = [await r2.api.authorize("s1", "c1"), await r1.api.authorize("s1", "c1")]
    for again in answers:
        assert (again.allowed, again.granted_seconds, again.max_seconds, again.expires_at) == (
            first.allowed,
            first.granted_seconds,
            first.max_seconds,
            first.expires_at,
        )
    assert (await r2.api.balance("c1")).voice.reserved_micros == 60 * CREDIT  # one slice, not three
    call = Call(r2.api)
    assert (await call.start("s1", "c1")).grant.granted_seconds == 60  # not released early by either


async def test_an_authorization_answered_nowhere_is_released_once_at_its_expiry(
    replicas: tuple[Running, Running], clock: ManualClock
) -> None:
    r1, r2 = replicas
    await r1.api.authorize("s1", "c1")
    await r2.api.authorize("s1", "c1")
    await clock.advance(60)
    assert await _used_and_reserved(r1) == (0, 0)
    final = await Call(r2.api).start("s1", "c1")
    assert (final.cutoff.reason, final.cutoff.billed_seconds) == (common_pb2.DENY_REASON_SESSION_ABANDONED, 0)


async def test_an_authorization_whose_replica_died_is_released_by_another_and_an_answered_call_billed(
    make_server: ServerFactory, clock: ManualClock
) -> None:
    # Nobody serves either call once their replica is gone: when their leases run out the
    # other replica's sweeper settles them, the answered one at its whole grant and the one
    # never answered at 0 s (it used nothing).
    async with make_server(clock=clock) as r2:
        async with make_server(clock=clock) as r1:
            api = r1.api
            await api.agency("a1", free_voice_micros=10_000 * CREDIT, default_voice_micros_per_minute=PER_SECOND)
            await api.plan("a1", "p", free_voice_micros=10_000 * CREDIT, default_voice_micros_per_minute=PER_SECOND)
            await api.client("c1", "a1", "p")
            await api.authorize("answered", "c1")
            await api.authorize("waiting", "c1")
            call = Call(api)
            await call.start("answered", "c1")
            await r1.app.metering.close()  # a crash: its timers go with it, nothing is settled
        assert await _used_and_reserved(r2) == (0, 2 * 60 * CREDIT)
        await clock.advance(60 + 60 + 30 + 5)  # past every lease: authorization, slice and grace
        assert await _used_and_reserved(r2) == (60 * CREDIT, 0)
        await r2.app.flusher.flush()
        sessions = Ledger(r2.app.ctx.settings.database_url).sessions()
        abandoned = common_pb2.DENY_REASON_SESSION_ABANDONED
        assert sessions["answered"] == ("settled", 60, 60, abandoned)
        assert sessions["waiting"] == ("settled", 60, 0, abandoned)
        assert await durability.reconcile(r2.app.ctx) == []
