"""One StreamUsage call: serialized writes, a reader task and the final message of the session."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from creditd_client.errors import CreditdError, DeadlineExceeded, from_rpc_error
from creditd_client.types import Cutoff, SessionEvent, SessionSummary, session_event
from creditd_client.v1 import metering_pb2

log = logging.getLogger("creditd_client")
Final = Cutoff | SessionSummary


class UsageStream:
    """Carries requests out and hands every answer to `on_event`, in order.

    The stream ends with a final message (Cutoff or SessionSummary), an error, or `cancel()`.
    Stream messages are never retried: a lost stream is resumed by the session, not replayed.
    """

    def __init__(
        self,
        call: Any,
        on_event: Callable[[SessionEvent], Awaitable[None]],
        on_error: Callable[[CreditdError], None] | None = None,
    ) -> None:
        self._call = call
        self._on_event = on_event
        self._on_error = on_error
        self._cancelled = False
        self._write_lock = asyncio.Lock()
        self.final: Final | None = None
        self.error: CreditdError | None = None
        self.done = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name="creditd-usage-stream")

    async def write(self, request: metering_pb2.StreamUsageRequest) -> bool:
        """Send one request; False when the stream has already ended (its end explains why)."""
        if self.done.is_set():
            return False
        async with self._write_lock:
            try:
                await self._call.write(request)
            except (grpc.RpcError, asyncio.InvalidStateError, RuntimeError) as exc:
                log.debug("write on an ended usage stream: %r", exc)
                return False
        return True

    async def _read(self) -> None:
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    if self.final is None:
                        self.error = CreditdError(grpc.StatusCode.UNAVAILABLE, "STREAM_ENDED", "the stream ended")
                    return
                event = session_event(message)
                if event is None:
                    continue
                if isinstance(event, Cutoff | SessionSummary):
                    self.final = event
                await self._on_event(event)
                if self.final is not None:
                    return
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.CANCELLED or self.final is None:
                self.error = from_rpc_error(exc)
        except asyncio.CancelledError:
            self.error = self.error or CreditdError(grpc.StatusCode.CANCELLED, "CANCELLED", "the stream was closed")
            raise
        finally:
            self.done.set()
            if self.error is not None and not self._cancelled and self._on_error is not None:
                self._on_error(self.error)

    async def wait(self, timeout: float) -> Final:
        """The final message; raises the stream's error, or DeadlineExceeded after `timeout`."""
        if not self.done.is_set():
            try:
                await asyncio.wait_for(self.done.wait(), timeout)
            except TimeoutError:
                raise deadline_exceeded(timeout) from None
        if self.final is not None:
            return self.final
        assert self.error is not None
        raise self.error

    async def cancel(self) -> None:
        """Stop reading and cancel the call (no error is reported for it)."""
        self._cancelled = True
        if not self.done.is_set():
            self._call.cancel()
        if self._reader is not asyncio.current_task():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


def deadline_exceeded(timeout: float) -> DeadlineExceeded:
    return DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", f"no answer within {timeout}s")
