"""Every call has a deadline; only safe calls are retried, only on UNAVAILABLE, with backoff."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from conftest import ADMIN_TOKEN, CREDIT

import creditd_client
from creditd_client import CreditdError, DeadlineExceeded, RetryPolicy, Unavailable, aio
from creditd_client.v1 import ledger_pb2, ledger_pb2_grpc, metering_pb2, metering_pb2_grpc
from tests.conftest import ServerFactory

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Recorder:
    def __init__(self) -> None:
        self.retries: list[tuple[str, int, str]] = []

    def __call__(self, method: str, attempt: int, error: CreditdError, delay: float) -> None:
        assert delay >= 0
        self.retries.append((method, attempt, error.reason))


async def test_reads_are_retried_on_unavailable_until_attempts_run_out() -> None:
    recorder = Recorder()
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    async with aio.Client(address, ADMIN_TOKEN, timeout=5, retry=FAST_RETRY, on_retry=recorder) as client:
        with pytest.raises(Unavailable) as unavailable:
            await client.get_balance("acme")
        assert unavailable.value.code is grpc.StatusCode.UNAVAILABLE
        assert unavailable.value.attempts == 4
        assert recorder.retries == [("GetBalance", n, "UNAVAILABLE") for n in (1, 2, 3)]

        # Account changes are never retried: a lost answer must not create twice.
        recorder.retries.clear()
        with pytest.raises(Unavailable) as once:
            await client.create_agency("acme")
        assert once.value.attempts == 1 and recorder.retries == []


async def test_retries_stop_at_the_deadline_of_the_call() -> None:
    slow = RetryPolicy(max_attempts=100, initial_backoff=0.1, max_backoff=0.1, jitter=0)
    address = f"127.0.0.1:{free_port()}"
    async with aio.Client(address, ADMIN_TOKEN, timeout=0.35, retry=slow) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable) as unavailable:
            await client.topup("acme", CREDIT, "key-1")
        assert time.monotonic() - started < 1.0
        assert 2 <= unavailable.value.attempts <= 4


def test_the_sync_client_retries_the_same_way() -> None:
    recorder = Recorder()
    with creditd_client.Client(f"127.0.0.1:{free_port()}", "k", retry=FAST_RETRY, on_retry=recorder) as client:
        with pytest.raises(Unavailable) as unavailable:
            client.authorize("call-1", "dental")
        assert unavailable.value.attempts == 4 and len(recorder.retries) == 3
        with pytest.raises(Unavailable) as once:
            client.create_client("dental", "acme", "plan")
        assert once.value.attempts == 1


async def test_a_top_up_retried_across_a_server_restart_credits_once(make_server: ServerFactory) -> None:
    listen = f"127.0.0.1:{free_port()}"
    recorder = Recorder()
    policy = RetryPolicy(max_attempts=60, initial_backoff=0.05, max_backoff=0.2)
    async with aio.Client(listen, ADMIN_TOKEN, timeout=15, retry=policy, on_retry=recorder) as client:
        async with make_server(listen=listen):
            await client.create_agency("restart-agency")
        # The server is down: the top-up waits, backing off, until it is back.
        topup = asyncio.ensure_future(client.topup("restart-agency", 7 * CREDIT, "pay-once"))
        await asyncio.sleep(0.6)
        assert not topup.done() and recorder.retries
        async with make_server(listen=listen):
            result = await asyncio.wait_for(topup, 15)
            assert all(method == "Topup" and reason == "UNAVAILABLE" for method, _, reason in recorder.retries)
            again = await client.topup("restart-agency", 7 * CREDIT, "pay-once")
            assert again.entry_id == result.entry_id
            balance = await client.get_balance("restart-agency")
            assert balance.voice.purchased_micros == 7 * CREDIT


class SlowLedger(ledger_pb2_grpc.LedgerServiceServicer):  # type: ignore[misc]
    """A stand-in server that records the deadline it sees and can be slow."""

    def __init__(self) -> None:
        self.remaining: list[float] = []
        self.delay = 0.0

    async def GetBalance(self, request: Any, context: Any) -> ledger_pb2.GetBalanceResponse:
        self.remaining.append(context.time_remaining())
        await asyncio.sleep(self.delay)
        return ledger_pb2.GetBalanceResponse(account_id=request.account_id)


class SilentMetering(metering_pb2_grpc.MeteringServiceServicer):  # type: ignore[misc]
    """Authorizes everything, then never answers on a usage stream."""

    async def Authorize(self, request: Any, context: Any) -> metering_pb2.AuthorizeResponse:
        return metering_pb2.AuthorizeResponse(allowed=True, granted_seconds=60, max_seconds=60)

    async def StreamUsage(self, requests: Any, context: Any) -> AsyncIterator[metering_pb2.StreamUsageResponse]:
        async for _ in requests:
            pass
        return
        yield  # an async generator that answers nothing


@pytest.fixture
async def slow() -> AsyncIterator[tuple[str, SlowLedger]]:
    servicer = SlowLedger()
    server = grpc.aio.server()
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(servicer, server)
    metering_pb2_grpc.add_MeteringServiceServicer_to_server(SilentMetering(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(0)


async def test_every_call_carries_a_deadline(slow: tuple[str, SlowLedger]) -> None:
    address, servicer = slow
    async with aio.Client(address, ADMIN_TOKEN) as client:  # default: 5 s
        await client.get_balance("acme")
        await client.get_balance("acme", timeout=1.5)
    assert 4.0 < servicer.remaining[0] <= 5.1
    assert 1.0 < servicer.remaining[1] <= 1.6

    def sync_call() -> None:
        with creditd_client.Client(address, ADMIN_TOKEN, timeout=2.5) as client:
            client.get_balance("acme")

    await asyncio.to_thread(sync_call)
    assert 2.0 < servicer.remaining[2] <= 2.6


async def test_a_slow_answer_raises_deadline_exceeded_and_is_not_retried(slow: tuple[str, SlowLedger]) -> None:
    address, servicer = slow
    servicer.delay = 1.0
    async with aio.Client(address, ADMIN_TOKEN, timeout=0.2, retry=FAST_RETRY) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as late:
            await client.get_balance("acme")
        assert time.monotonic() - started < 0.8
    assert late.value.code is grpc.StatusCode.DEADLINE_EXCEEDED and late.value.attempts == 1
    assert len(servicer.remaining) == 1


async def test_stream_exchanges_wait_for_their_answer_within_the_deadline(slow: tuple[str, SlowLedger]) -> None:
    address, _ = slow
    async with aio.Client(address, ADMIN_TOKEN, timeout=0.3) as client:
        session = await client.voice_session("call-1", "dental")
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await session.answer()  # no grant comes
        with pytest.raises(DeadlineExceeded):
            await session.hang_up()  # no summary comes
        await session.close()
        sender = await client.sms_sender("dental")
        with pytest.raises(DeadlineExceeded):
            await sender.send("m1", "US", timeout=0.2)
        assert time.monotonic() - started < 2
        with pytest.raises(DeadlineExceeded):
            await sender.close()
