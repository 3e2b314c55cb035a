"""Graceful shutdown: SIGTERM drains, live calls are cut at the deadline and billed once."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import grpc
import pytest
from creditd_client.v1 import common_pb2, ledger_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import CREDIT, Api, error_info
from tests.operations.serve import Serve

TOKEN = "cdk_admin_drain-test-0123456789"
READINESS = "creditd.v1.MeteringService"


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return int(reply.status)


async def test_sigterm_drains_then_cuts_the_live_call_and_bills_it_exactly_once(tmp_path: Path) -> None:
    env = {"CREDITD_ADMIN_TOKEN": TOKEN, "CREDITD_DRAIN_SECONDS": "2"}
    server = Serve(tmp_path, **env)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            api = Api(channel, TOKEN)
            await api.agency("a1")
            await api.plan("a1", "p", free_voice_micros=0, default_voice_micros_per_minute=6 * CREDIT)
            await api.client("c1", "a1", "p")
            await api.topup("c1", 10 * CREDIT, "paid")
            assert (await api.authorize("live", "c1")).allowed
            call, first = await api.start_call("live", "c1")
            assert first.grant.granted_seconds == 60
            assert await _health(channel, READINESS) == health_pb2.HealthCheckResponse.SERVING
            loop = asyncio.get_running_loop()
            signalled = loop.time()
            server.signal()

            for _ in range(100):  # readiness goes NOT_SERVING at once
                if await _health(channel, READINESS) == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("readiness stayed SERVING while draining")
            assert loop.time() - signalled < 1.5
            assert await _health(channel, "") == health_pb2.HealthCheckResponse.SERVING  # alive while draining
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await api.authorize("new-call", "c1")
            assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
            assert error_info(raised.value).metadata["state"] == "draining"

            while True:  # the live call goes on until the drain deadline, then is cut
                message = await asyncio.wait_for(call.read(), 10)
                if message.WhichOneof("msg") == "cutoff":
                    break
            cut_after = loop.time() - signalled
            assert 1.9 <= cut_after < 4.0
            assert message.cutoff.reason == common_pb2.DENY_REASON_SERVICE_UNAVAILABLE
            billed = message.cutoff.billed_seconds
            assert 2 <= billed <= 4
        assert server.wait(20) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert any("creditd stopped" in line for line in server.lines)

    # The same data, a new process: one settlement, nothing reserved, nothing lost.
    again = Serve(tmp_path, **env)
    try:
        async with grpc.aio.insecure_channel(again.address) as channel:
            api = Api(channel, TOKEN)
            cost = math.ceil(6 * CREDIT * billed / 60)
            voice = (await api.balance("c1")).voice
            assert (voice.purchased_micros, voice.reserved_micros) == (10 * CREDIT - cost, 0)
            assert voice.period_used_micros == cost
            agency = (await api.balance("a1")).voice
            assert agency.reserved_micros == 0
            assert agency.free_micros == 300 * CREDIT - math.ceil(CREDIT * billed / 60)
            entries = await api.ledger.ListLedgerEntries(
                ledger_pb2.ListLedgerEntriesRequest(account_id="c1"), metadata=api.metadata
            )
            usage = [e for e in entries.entries if e.kind == ledger_pb2.LEDGER_ENTRY_KIND_VOICE_USAGE]
            assert [(e.session_id, e.seconds, e.amount_micros) for e in usage] == [("live", billed, -cost)]
    finally:
        assert again.stop() == 0
    assert "settled" not in again.logs()  # no session was left open for the restart to settle


async def test_a_second_sigterm_cuts_live_calls_at_once(tmp_path: Path) -> None:
    server = Serve(tmp_path, CREDITD_ADMIN_TOKEN=TOKEN, CREDITD_DRAIN_SECONDS="60")
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            api = Api(channel, TOKEN)
            await api.agency("a1")
            await api.plan("a1", "p", free_voice_micros=10 * CREDIT)
            await api.client("c1", "a1", "p")
            await api.authorize("live", "c1")
            call, _ = await api.start_call("live", "c1")
            server.signal()
            server.read_until("creditd draining")
            started = asyncio.get_running_loop().time()
            server.signal()
            while (message := await asyncio.wait_for(call.read(), 10)).WhichOneof("msg") != "cutoff":
                pass
            assert asyncio.get_running_loop().time() - started < 2
            assert message.cutoff.reason == common_pb2.DENY_REASON_SERVICE_UNAVAILABLE
        assert server.wait(20) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
