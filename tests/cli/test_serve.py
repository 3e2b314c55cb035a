"""`creditd serve` as a user runs it: no configuration, a crash, a restart."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from creditd_client.v1 import common_pb2, ledger_pb2, metering_pb2

from tests.conftest import CREDIT, Api


class Serve:
    """A `creditd serve` process; stdout is read until it says where it listens."""

    def __init__(self, home: Path, *args: str, **env: str) -> None:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("CREDITD_")}
        environ.update(HOME=str(home), PYTHONUNBUFFERED="1", **env)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "creditd.cli", "serve", *args],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("  e.g. export") or "Bearer <CREDITD_ADMIN_TOKEN>" in line:
                break
        else:
            raise AssertionError("creditd serve exited: " + "".join(self.lines))
        text = "".join(self.lines)
        match = re.search(r"listening on (\S+)", text)
        assert match, text
        self.address = match.group(1)
        key = re.search(r"admin key for this run .*: (\S+)", text)
        self.admin_key = key.group(1) if key else env.get("CREDITD_ADMIN_TOKEN", "")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(20)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


async def test_serve_runs_with_no_configuration_and_prints_how_to_authenticate(home: Path) -> None:
    server = Serve(home)
    try:
        assert server.address == "127.0.0.1:50051" or server.address.startswith("127.0.0.1:")
        assert server.admin_key.startswith("cdk_")
        assert (home / ".local" / "share" / "creditd" / "creditd.db").exists()
        async with grpc.aio.insecure_channel(server.address) as channel:
            api = Api(channel, server.admin_key)
            await api.agency("a1")
            assert (await api.balance("a1")).voice.free_micros == 300 * CREDIT
    finally:
        assert server.stop() == 0


async def test_a_killed_server_loses_no_top_up_and_settles_open_calls_on_restart(home: Path) -> None:
    env = {"CREDITD_ADMIN_TOKEN": "cdk_admin_crash", "CREDITD_LISTEN": "127.0.0.1:0", "CREDITD_SLICE_SECONDS": "30"}
    server = Serve(home, **env)
    async with grpc.aio.insecure_channel(server.address) as channel:
        api = Api(channel, "cdk_admin_crash")
        await api.agency("a1")
        await api.plan("a1", "p", free_voice_micros=100 * CREDIT)
        await api.client("c1", "a1", "p")
        await api.topup("c1", 7 * CREDIT, "paid-before-crash")
        await api.authorize("live-call", "c1")
        await api.start_call("live-call", "c1")
        await asyncio.sleep(0.6)  # past the write-behind interval (0.2 s): the slice is durable
    server.kill()

    server = Serve(home, **env)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            api = Api(channel, "cdk_admin_crash")
            client = (await api.balance("c1")).voice
            assert client.purchased_micros == 7 * CREDIT  # the acknowledged top-up survived
            assert client.reserved_micros == 0
            # the call nobody serves anymore is settled at what it was granted: 30 s at 1 credit/min
            assert client.free_micros == 100 * CREDIT - 500_000
            again = await api.topup("c1", 7 * CREDIT, "paid-before-crash")
            assert again.balance.purchased_micros == 7 * CREDIT
            entries = await api.ledger.ListLedgerEntries(
                ledger_pb2.ListLedgerEntriesRequest(account_id="c1", balance_type=common_pb2.BALANCE_TYPE_VOICE),
                metadata=api.metadata,
            )
            assert sum(e.free_micros for e in entries.entries) == client.free_micros
            assert sum(e.purchased_micros for e in entries.entries) == client.purchased_micros
            call = api.stream()
            await call.write(
                metering_pb2.StreamUsageRequest(
                    start=metering_pb2.SessionStart(
                        session_id="live-call", client_id="c1", channel=common_pb2.CHANNEL_VOICE
                    )
                )
            )
            final = await call.read()
            assert final.cutoff.reason == common_pb2.DENY_REASON_SESSION_ABANDONED
            assert final.cutoff.billed_seconds == 30
    finally:
        server.stop()
