"""grpc.health.v1: liveness ("") stays SERVING while the process lives; readiness (the
creditd.v1 services) follows Redis and Postgres and comes back when they do."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from creditd_client.v1 import common_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from tests.conftest import CREDIT, Api, Running, ServerFactory, error_info
from tests.operations.outages import Proxy, RedisServer

pytestmark = pytest.mark.parametrize("backend", ["redis+postgres"], indirect=True)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
READINESS = ("creditd.v1.MeteringService", "creditd.v1.LedgerService", "creditd.v1.AccountService")


async def _status(api: Api, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(api.channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=2
    )
    return int(reply.status)


async def _until(api: Api, service: str, want: int, within: float = 10.0) -> float:
    """Seconds until `service` reports `want`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while await _status(api, service) != want:
        assert loop.time() - started < within, f"{service or 'liveness'} never became {want}"
        await asyncio.sleep(0.05)
    return loop.time() - started


async def _watched(api: Api, service: str) -> AsyncIterator[int]:
    call = health_pb2_grpc.HealthStub(api.channel).Watch(health_pb2.HealthCheckRequest(service=service))
    try:
        async for reply in call:
            yield int(reply.status)
    finally:
        call.cancel()


async def _setup(api: Api) -> None:
    await api.agency("a1")
    await api.plan("a1", "p", free_voice_micros=10 * CREDIT)
    await api.client("c1", "a1", "p")
    await api.topup("c1", 3 * CREDIT, "before-the-outage")


async def _assert_fails_closed(running: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await running.api.authorize("during-outage", "c1")
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert error_info(raised.value).reason == "STORE_UNAVAILABLE"


async def test_readiness_follows_redis_and_liveness_does_not(
    make_server: ServerFactory, backend: dict[str, str], tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        async with make_server(redis_url=redis.url) as running:
            api = running.api
            await _setup(api)
            for service in ("", *READINESS):
                assert await _status(api, service) == SERVING
            watch = _watched(api, READINESS[0])
            assert await anext(watch) == SERVING

            redis.stop()
            assert await _until(api, READINESS[0], NOT_SERVING) < 5
            assert await anext(watch) == NOT_SERVING  # watchers are told too
            for service in READINESS:
                assert await _status(api, service) == NOT_SERVING
            assert await _status(api, "") == SERVING  # liveness: no restart would bring Redis back
            await _assert_fails_closed(running)

            redis.start()  # empty: the replica rebuilds it from Postgres before serving again
            assert await _until(api, READINESS[0], SERVING) < 10
            assert await anext(watch) == SERVING
            await watch.aclose()
            assert await _status(api, "") == SERVING
            voice = (await api.balance("c1")).voice
            assert (voice.free_micros, voice.purchased_micros) == (10 * CREDIT, 3 * CREDIT)  # nothing lost
            assert (await api.authorize("after-outage", "c1")).allowed
    finally:
        redis.stop()


async def test_readiness_follows_postgres_and_liveness_does_not(
    make_server: ServerFactory, backend: dict[str, str]
) -> None:
    url = make_url(backend["database_url"])
    proxy = Proxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    through_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    try:
        async with make_server(database_url=through_proxy, redis_url="") as running:
            api = running.api
            await _setup(api)
            assert await _status(api, READINESS[0]) == SERVING

            await proxy.pause()  # Postgres unreachable: connections cut, new ones refused
            assert await _until(api, READINESS[0], NOT_SERVING) < 5
            assert await _status(api, "") == SERVING
            await _assert_fails_closed(running)

            await proxy.start()
            assert await _until(api, READINESS[0], SERVING) < 10
            assert await _status(api, "") == SERVING
            answer = await api.authorize("after-outage", "c1")
            assert answer.allowed and answer.granted_seconds > 0
            voice = (await api.balance("c1")).voice
            assert voice.purchased_micros == 3 * CREDIT
    finally:
        await proxy.close()


async def test_a_live_call_is_cut_at_the_end_of_its_grant_while_the_hot_store_is_gone(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    """Fail closed for live calls too: without Redis nothing is renewed and the call is cut at
    the exact end of its grant, even though the settlement must wait for Redis."""
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        async with make_server(redis_url=redis.url, slice_seconds=2, renewal_lead_seconds=1.0) as running:
            api = running.api
            await _setup(api)
            await api.authorize("call", "c1")
            call, first = await api.start_call("call", "c1")
            assert first.grant.granted_seconds == 2
            redis.stop()
            while (message := await asyncio.wait_for(call.read(), 4)).WhichOneof("msg") != "cutoff":
                assert message.WhichOneof("msg") != "grant", "a slice was granted without the hot store"
            assert message.cutoff.reason == common_pb2.DENY_REASON_SERVICE_UNAVAILABLE
            assert message.cutoff.billed_seconds == 2
    finally:
        redis.stop()
