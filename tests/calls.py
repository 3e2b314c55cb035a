"""A voice call as a test drives it: its stream's messages collected as they arrive."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import grpc
from creditd_client.v1 import common_pb2, metering_pb2

from creditd.engine.voice import VoiceSession
from tests.conftest import Api, Running

WAIT_SECONDS = 30.0  # generous: the machine may be busy


class Call:
    """One StreamUsage stream. A task reads every message into `messages`; `next` waits for
    the next one not yet taken, so a test never blocks on a read that cannot come."""

    def __init__(self, api: Api) -> None:
        self.call: Any = api.stream()
        self.messages: list[metering_pb2.StreamUsageResponse] = []
        self.error: grpc.aio.AioRpcError | None = None
        self.closed = False
        self._taken = 0
        self._arrived = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.call:
                self.messages.append(message)
                self._arrived.set()
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        except asyncio.CancelledError:
            pass
        finally:
            self.closed = True
            self._arrived.set()

    async def start(self, session_id: str, client_id: str, channel: int = common_pb2.CHANNEL_VOICE) -> Any:
        await self.call.write(
            metering_pb2.StreamUsageRequest(
                start=metering_pb2.SessionStart(session_id=session_id, client_id=client_id, channel=channel)
            )
        )
        return await self.next()

    async def report(self, seconds: int) -> None:
        await self.call.write(metering_pb2.StreamUsageRequest(usage=metering_pb2.UsageReport(seconds_used=seconds)))

    async def end(self, seconds: int) -> Any:
        """End the call; returns its last message (the summary, or a cutoff that came first)."""
        await self.call.write(metering_pb2.StreamUsageRequest(end=metering_pb2.SessionEnd(seconds_used=seconds)))
        while True:
            message = await self.next()
            if message.WhichOneof("msg") in ("summary", "cutoff"):
                return message

    async def next(self, kind: str | None = None) -> Any:
        """The next message (of `kind`, skipping others); fails if the stream ends first."""
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            while self._taken < len(self.messages):
                message = self.messages[self._taken]
                self._taken += 1
                if kind is None or message.WhichOneof("msg") == kind:
                    return message
            assert not self.closed, f"the stream ended ({self.error}) before a {kind or 'message'} came"
            self._arrived.clear()
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {kind or 'message'} within {WAIT_SECONDS}s"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def pending(self) -> list[str]:
        """Kinds of the messages received and not taken yet."""
        return [m.WhichOneof("msg") for m in self.messages[self._taken :]]

    async def ended(self) -> grpc.aio.AioRpcError | None:
        """Wait until the server closed the stream; its error, if it ended with one."""
        await asyncio.wait_for(asyncio.shield(self._reader), WAIT_SECONDS)
        return self.error

    def cancel(self) -> None:
        """The network drops the stream (no SessionEnd)."""
        self.call.cancel()


def session(running: Running, session_id: str, agency_id: str = "a1") -> VoiceSession | None:
    """The live session as this server's engine holds it (None once settled)."""
    return running.app.metering.voice.get(agency_id, session_id)


async def until(predicate: Any, what: str, within: float = WAIT_SECONDS) -> None:
    """Poll (real time) for something that does not depend on the clock, e.g. a notification."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {within}s"
        await asyncio.sleep(0.01)
