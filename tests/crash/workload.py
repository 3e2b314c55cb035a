"""What callers do while a store or a server crashes: live voice calls, short calls and top-ups.

Each records what the server acknowledged and when, so a test can tell afterwards what
was durable and what the crash-loss bound allowed to be lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from creditd_client.v1 import metering_pb2

from tests.conftest import Api


class LiveCall:
    """A voice call that reports its cumulative seconds every `report_every` seconds."""

    def __init__(self, api: Api, session_id: str, client_id: str, report_every: float = 1.0) -> None:
        self.api = api
        self.session_id = session_id
        self.client_id = client_id
        self.report_every = report_every
        self.granted = 0
        self.grants: list[tuple[float, int]] = []  # (monotonic time, cumulative granted seconds)
        self.final: metering_pb2.StreamUsageResponse | None = None
        self.final_at: float | None = None
        self.error: grpc.aio.AioRpcError | None = None
        self.started = 0.0
        self.call: Any = None
        self._task: asyncio.Task[None] | None = None
        self._reporter: asyncio.Task[None] | None = None

    async def open(self, stream_api: Api | None = None) -> None:
        """Authorize, then start the stream (on `stream_api`, another replica, if given)."""
        answer = await self.api.authorize(self.session_id, self.client_id)
        assert answer.allowed, answer
        self.started = time.monotonic()
        await self._stream(stream_api or self.api)

    async def resume(self, api: Api) -> None:
        """What a worker does when its stream broke: SessionStart again, on any server; the
        call goes on counting its seconds from when it started."""
        self.cancel()
        self.error = None
        self.api = api
        await self._stream(api)

    async def _stream(self, api: Api) -> None:
        self.call, first = await api.start_call(self.session_id, self.client_id)
        self._take(first)
        self._task = asyncio.create_task(self._read())
        self._reporter = asyncio.create_task(self._report())

    def seconds_used(self) -> int:
        return min(self.granted, int(time.monotonic() - self.started))

    @property
    def done(self) -> bool:
        return self.final is not None or self.error is not None

    def _take(self, message: metering_pb2.StreamUsageResponse) -> None:
        kind = message.WhichOneof("msg")
        if kind == "grant":
            self.granted = message.grant.granted_seconds
            self.grants.append((time.monotonic(), self.granted))
        elif kind in ("cutoff", "summary"):
            self.final = message
            self.final_at = time.monotonic()

    async def _read(self) -> None:
        try:
            while self.final is None:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    break
                self._take(message)
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        finally:
            if self._reporter is not None:
                self._reporter.cancel()

    async def _report(self) -> None:
        with contextlib.suppress(Exception):
            while not self.done:
                await asyncio.sleep(self.report_every)
                await self.call.write(
                    metering_pb2.StreamUsageRequest(usage=metering_pb2.UsageReport(seconds_used=self.seconds_used()))
                )

    async def end(self, within: float = 10) -> int:
        """Send SessionEnd (if the stream still lives) and wait for the last message; returns
        the seconds it reported."""
        used = self.seconds_used()
        if not self.done:
            with contextlib.suppress(Exception):
                await self.call.write(metering_pb2.StreamUsageRequest(end=metering_pb2.SessionEnd(seconds_used=used)))
        await self.wait(within)
        return used

    async def wait(self, within: float) -> None:
        assert self._task is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._task), within)

    def cancel(self) -> None:
        for task in (self._task, self._reporter):
            if task is not None:
                task.cancel()
        if self.call is not None:
            self.call.cancel()


@dataclass
class Topups:
    """Top-ups of `amount` micros on `account_id`, one idempotency key each, back to back."""

    api: Api
    account_id: str
    amount: int
    prefix: str
    acked: dict[str, float] = field(default_factory=dict)  # key -> monotonic time of the OK
    failed: dict[str, grpc.StatusCode] = field(default_factory=dict)  # outcome unknown to the caller
    count: int = 0

    async def one(self) -> bool:
        key = f"{self.prefix}-{self.count}"
        self.count += 1
        try:
            await self.api.topup(self.account_id, self.amount, key)
        except grpc.aio.AioRpcError as exc:
            self.failed[key] = exc.code()
            return False
        self.acked[key] = time.monotonic()
        return True

    async def run(self, stop: asyncio.Event, pause: float = 0.02) -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.one(), 5)
            await asyncio.sleep(pause)

    async def retry_failed(self) -> None:
        """What a payment webhook does: send every unanswered top-up again, same key."""
        for key in list(self.failed):
            await self.api.topup(self.account_id, self.amount, key)
            del self.failed[key]
            self.acked[key] = time.monotonic()
