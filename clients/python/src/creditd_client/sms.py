"""An SMS sending session: one stream, one allow/deny answer per message.

    async with client.sms_sender("dental-1") as sender:      # or: sender = await client.sms_sender(...)
        result = await sender.send("msg-1", "US", segments=1)  # SmsResult(allowed=True, ...)
    sender.summary                                              # set when the block closed it

After a denial or a cutoff the sender is closed: `send` raises `SessionClosed(reason)`.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from creditd_client import enums
from creditd_client._stream import Final, UsageStream, deadline_exceeded
from creditd_client.enums import EnumArg
from creditd_client.errors import CreditdError, SessionClosed
from creditd_client.types import Cutoff, SessionEvent, SessionSummary, SmsResult
from creditd_client.v1 import common_pb2, metering_pb2

if TYPE_CHECKING:
    from creditd_client.aio import Client


class SmsSender:
    """Create it with `aio.Client.sms_sender`, then `async with` it (or `await` it) to open
    its stream; closing returns the summary."""

    def __init__(
        self, client: Client, client_id: str, *, session_id: str | None = None, direction: EnumArg = "outbound"
    ) -> None:
        self.client = client
        self.client_id = client_id
        self.session_id = session_id or f"sms-{uuid.uuid4().hex}"
        self.direction = enums.direction(direction)
        self._stream: UsageStream | None = None
        self._pending: collections.deque[tuple[str, asyncio.Future[SmsResult]]] = collections.deque()
        self._closed: CreditdError | None = None  # what a send raises once the sender is closed
        self.cutoff: Cutoff | None = None
        self.summary: SessionSummary | None = None

    @property
    def closed(self) -> bool:
        """True after a denial, a cutoff, an error or close()."""
        return self._closed is not None

    @property
    def final(self) -> Final | None:
        return self.cutoff or self.summary

    async def open(self) -> None:
        """Open the stream (once; `async with` and `await` call it)."""
        if self._stream is not None:
            return
        self._stream = UsageStream(self.client._usage_stream(), self._dispatch, self._fail_pending)
        start = metering_pb2.SessionStart(
            session_id=self.session_id,
            client_id=self.client_id,
            channel=common_pb2.CHANNEL_SMS,
            direction=self.direction,  # type: ignore[arg-type]
        )
        await self._stream.write(metering_pb2.StreamUsageRequest(start=start))

    async def send(
        self, message_id: str, destination_country: str, segments: int = 1, *, timeout: float | None = None
    ) -> SmsResult:
        """Ask to send one message (idempotent by message_id): allowed and charged, or denied.

        A denied message closes the sender; so does a cutoff (a suspended subscription).
        """
        stream = self._stream
        if stream is None:
            raise RuntimeError("open() first")
        if self._closed is not None:
            raise self._closed
        answer: asyncio.Future[SmsResult] = asyncio.get_running_loop().create_future()
        self._pending.append((message_id, answer))
        sms = metering_pb2.SmsSend(message_id=message_id, destination_country=destination_country, segments=segments)
        await stream.write(metering_pb2.StreamUsageRequest(sms=sms))
        limit = timeout or self.client.options.timeout
        try:
            result = await asyncio.wait_for(asyncio.shield(answer), limit)
        except TimeoutError:
            answer.cancel()
            raise deadline_exceeded(limit) from None
        if not result.allowed:
            self._close(SessionClosed(result.deny_reason or "DENIED", "a message was denied; this sender is closed"))
        return result

    async def close(self, timeout: float | None = None) -> Final:
        """End the session; returns its SessionSummary (or the Cutoff that ended it first)."""
        stream = self._stream
        if stream is None:
            raise RuntimeError("open() first")
        if self.final is None and stream.error is None:
            await stream.write(metering_pb2.StreamUsageRequest(end=metering_pb2.SessionEnd()))
        self._close(SessionClosed("ENDED", "this SMS sender is closed"))
        try:
            return await stream.wait(timeout or self.client.options.timeout)
        finally:
            await stream.cancel()

    def __await__(self) -> Generator[Any, None, SmsSender]:
        return self._opened().__await__()

    async def _opened(self) -> SmsSender:
        await self.open()
        return self

    async def __aenter__(self) -> SmsSender:
        return await self._opened()

    async def __aexit__(self, *_: object) -> None:
        if self._stream is not None and not self._stream.done.is_set():
            try:
                await self.close()
            except CreditdError:
                await self._stream.cancel()

    async def _dispatch(self, event: SessionEvent) -> None:
        if isinstance(event, SmsResult):
            while self._pending:
                message_id, answer = self._pending.popleft()
                if not answer.done():
                    answer.set_result(event)
                if message_id == event.message_id:
                    break
        elif isinstance(event, Cutoff):
            self.cutoff = event
            self._fail_pending(SessionClosed(event.reason, "the SMS session was cut off"))
        elif isinstance(event, SessionSummary):
            self.summary = event
            self._fail_pending(SessionClosed("ENDED", "this SMS sender is closed"))

    def _close(self, error: CreditdError) -> None:
        if self._closed is None:
            self._closed = error

    def _fail_pending(self, error: CreditdError) -> None:
        """The stream ended: messages whose answer never came were not confirmed (resending
        them with the same message_id never charges twice)."""
        self._close(error)
        while self._pending:
            _, answer = self._pending.popleft()
            if not answer.done():
                answer.set_exception(error)
