"""Transport limits: message size, streams per connection, keepalive both ways, deadlines."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from creditd_client.v1 import account_pb2, common_pb2, ledger_pb2, metering_pb2

from tests.conftest import ADMIN_TOKEN, CREDIT, Api, Running, ServerFactory
from tests.operations.outages import Proxy

pytestmark = pytest.mark.parametrize("backend", ["embedded"], indirect=True)
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)  # a channel of its own: not shared with others


async def _setup(api: Api) -> None:
    await api.agency("a1")
    await api.plan("a1", "p", free_voice_micros=100 * CREDIT)
    await api.client("c1", "a1", "p")


async def test_a_request_over_the_size_limit_is_refused_and_the_server_lives_on(make_server: ServerFactory) -> None:
    async with make_server(max_message_bytes=4096) as running:
        api = running.api
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await api.agency("big", display_name="x" * 10_000)
        assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        await api.agency("small", display_name="x" * 100)  # the same connection still works
        with pytest.raises(grpc.aio.AioRpcError):
            await api.accounts.GetAccount(account_pb2.GetAccountRequest(account_id="big"), metadata=api.metadata)


async def test_streams_over_the_per_connection_limit_wait_for_a_free_one(make_server: ServerFactory) -> None:
    async with make_server(max_concurrent_streams=2) as running:
        await _setup(running.api)
        async with grpc.aio.insecure_channel(running.app.address, options=[OWN_CONNECTION]) as channel:
            api = Api(channel, ADMIN_TOKEN)
            request = ledger_pb2.WatchBalanceRequest(account_id="c1")
            watches = [api.ledger.WatchBalance(request, metadata=api.metadata) for _ in range(2)]
            for watch in watches:
                await watch.read()
            with pytest.raises(grpc.aio.AioRpcError) as raised:  # a third stream on this connection waits
                await api.ledger.GetBalance(
                    ledger_pb2.GetBalanceRequest(account_id="c1"), metadata=api.metadata, timeout=0.5
                )
            assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert (await running.api.balance("c1")).account_id == "c1"  # other connections are not held up
            watches[0].cancel()
            assert (await api.balance("c1")).account_id == "c1"  # a stream ended: room again
            watches[1].cancel()


async def test_a_client_that_pings_too_often_is_disconnected(make_server: ServerFactory) -> None:
    async with make_server(keepalive_min_seconds=10) as running:
        await _setup(running.api)
        pinging = [
            OWN_CONNECTION,
            ("grpc.keepalive_time_ms", 100),
            ("grpc.keepalive_timeout_ms", 1000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        async with grpc.aio.insecure_channel(running.app.address, options=pinging) as channel:
            api = Api(channel, ADMIN_TOKEN)
            watch = api.ledger.WatchBalance(ledger_pb2.WatchBalanceRequest(account_id="c1"), metadata=api.metadata)
            await watch.read()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await asyncio.wait_for(watch.read(), 10)
            assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "too many pings" in (raised.value.details() or "").lower()
        assert (await running.api.balance("c1")).account_id == "c1"  # the server lives on


async def test_a_caller_that_vanishes_without_closing_is_found_by_keepalive(make_server: ServerFactory) -> None:
    """A voice agent whose host dies keeps its TCP connection half open: server pings find
    it, its stream ends like a dropped one, and after the grace period the session is settled
    instead of renewing slices for a call nobody is on."""
    async with make_server(
        keepalive_time_seconds=0.5,
        keepalive_timeout_seconds=0.5,
        grace_seconds=0.5,
        slice_seconds=4,
        renewal_lead_seconds=2.0,
    ) as running:
        await _setup(running.api)
        host, port = running.app.address.rsplit(":", 1)
        proxy = Proxy(host, int(port))
        await proxy.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}", options=[OWN_CONNECTION]) as channel:
                agent = Api(channel, ADMIN_TOKEN)
                await agent.authorize("call", "c1")
                _, first = await agent.start_call("call", "c1")
                assert first.grant.granted_seconds == 4
                proxy.blackhole()  # the agent's host is gone: nothing answers, nothing is closed
                loop = asyncio.get_running_loop()
                started = loop.time()
                while ("a1", "call") in running.app.metering.runs:
                    assert loop.time() - started < 3.5, "the session was still served past its first slice"
                    await asyncio.sleep(0.05)
        finally:
            await proxy.close()
        voice = (await running.api.balance("c1")).voice
        assert voice.reserved_micros == 0
        assert voice.free_micros >= 100 * CREDIT - 4 * CREDIT // 60  # billed no more than the first slice


async def _subscribers(running: Running) -> int:
    await asyncio.sleep(0.1)  # let cancelled handlers finish
    return len(running.app.ctx.bus._subscribers)


async def test_a_client_deadline_ends_a_watch_and_leaves_nothing_behind(make_server: ServerFactory) -> None:
    async with make_server() as running:
        api = running.api
        await _setup(api)
        baseline = await _subscribers(running)
        tasks = len(asyncio.all_tasks())
        for _ in range(20):
            watch = api.ledger.WatchBalance(
                ledger_pb2.WatchBalanceRequest(account_id="c1"), metadata=api.metadata, timeout=0.2
            )
            events = api.ledger.WatchEvents(
                ledger_pb2.WatchEventsRequest(account_id="c1"), metadata=api.metadata, timeout=0.2
            )
            assert (await watch.read()).account_id == "c1"
            for call in (watch, events):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await call.read()
                assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert await _subscribers(running) == baseline
        assert len(asyncio.all_tasks()) <= tasks + 2
        # A usage stream with a deadline: the call is dropped, the session held for its grace period.
        await api.authorize("s1", "c1")
        call = api.metering.StreamUsage(metadata=api.metadata, timeout=0.3)
        start = metering_pb2.SessionStart(session_id="s1", client_id="c1", channel=common_pb2.CHANNEL_VOICE)
        await call.write(metering_pb2.StreamUsageRequest(start=start))
        await call.read()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call.read()
        assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(0.1)
        assert running.app.metering.runs[("a1", "s1")]._out is None  # detached: resumable, not served
        assert await _subscribers(running) == baseline
