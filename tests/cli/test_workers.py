"""`creditd serve --workers N`: N processes on one port, each a full replica."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from creditd_client.v1 import account_pb2

from tests import services
from tests.calls import Call
from tests.conftest import ADMIN_TOKEN, CREDIT, Api

WAIT_SECONDS = 60.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


@pytest.fixture
def stores(postgres_template: str) -> Iterator[dict[str, str]]:
    with services.redis_and_postgres(postgres_template) as settings:
        yield settings


def _env(stores: dict[str, str], port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITD_")}
    env.update(
        PYTHONUNBUFFERED="1",
        CREDITD_LISTEN=f"127.0.0.1:{port}",
        CREDITD_DATABASE_URL=stores["database_url"],
        CREDITD_REDIS_URL=stores["redis_url"],
        CREDITD_REDIS_PREFIX=stores["redis_prefix"],
        CREDITD_ADMIN_TOKEN=ADMIN_TOKEN,
        CREDITD_DRAIN_SECONDS="0",
        **extra,
    )
    return env


async def _answers(address: str) -> Api:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        channel = grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        api = Api(channel, ADMIN_TOKEN)
        try:
            await api.accounts.ListAccounts(account_pb2.ListAccountsRequest(), metadata=api.metadata, timeout=2)
            return api
        except grpc.aio.AioRpcError:
            await channel.close()
            assert time.monotonic() < deadline, "the workers never answered"
            await asyncio.sleep(0.2)


async def test_workers_share_one_port_and_a_call_does_not_care_which_one_serves_it(
    stores: dict[str, str],
) -> None:
    port = _free_port()
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "creditd.cli", "serve", "--workers", "2", env=_env(stores, port)
    )
    try:
        api = await _answers(f"127.0.0.1:{port}")
        deadline = time.monotonic() + WAIT_SECONDS
        while len(_children(parent.pid)) < 2:
            assert time.monotonic() < deadline, "two workers never ran"
            await asyncio.sleep(0.1)
        await api.agency("a1", free_voice_micros=1000 * CREDIT, default_voice_micros_per_minute=60 * CREDIT)
        await api.plan("a1", "p", free_voice_micros=1000 * CREDIT, default_voice_micros_per_minute=60 * CREDIT)
        await api.client("c1", "a1", "p")
        # Each call on connections of its own: the kernel spreads them over the workers, and
        # a stream may land on another worker than its Authorize.
        for n in range(8):
            authorizer = await _answers(f"127.0.0.1:{port}")
            streamer = await _answers(f"127.0.0.1:{port}")
            assert (await authorizer.authorize(f"s{n}", "c1")).allowed
            call = Call(streamer)
            assert (await call.start(f"s{n}", "c1")).WhichOneof("msg") == "grant"
            assert (await call.end(3)).summary.billed_seconds == 3
            await authorizer.channel.close()
            await streamer.channel.close()
        assert (await api.balance("c1")).voice.period_used_micros == 8 * 3 * CREDIT
        # A worker that dies is started again; the others serve meanwhile.
        victim = _children(parent.pid)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + WAIT_SECONDS
        while victim in _children(parent.pid) or len(_children(parent.pid)) < 2:
            assert time.monotonic() < deadline, "the dead worker was not started again"
            await asyncio.sleep(0.1)
        assert (await (await _answers(f"127.0.0.1:{port}")).balance("c1")).voice.reserved_micros == 0
        await api.channel.close()
    finally:
        parent.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(parent.wait(), WAIT_SECONDS) == 0
    assert _children(parent.pid) == []


def test_several_workers_need_a_shared_hot_store(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITD_")}
    env.update(HOME=str(tmp_path), CREDITD_LISTEN=f"127.0.0.1:{_free_port()}")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "creditd.cli", "serve", "--workers", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0 and time.monotonic() - started < 10
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CREDITD_REDIS_URL" in lines[0], result.stderr
