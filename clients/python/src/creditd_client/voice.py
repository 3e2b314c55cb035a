"""A voice call, from answer to hang-up or cutoff.

    session = await client.voice_session(call_id, client_id, provider="elevenlabs", on_cutoff=hang_up_now)
    await session.answer()                 # opens the stream; usage is reported every 5 s
    async for event in session:            # Grant, LowCreditWarning, then Cutoff or SessionSummary
        ...
    summary = await session.hang_up()      # SessionEnd: settled, the summary comes back

If the server cuts the call off, iteration ends with the Cutoff and `session.cutoff` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from creditd_client._stream import Final, UsageStream, deadline_exceeded
from creditd_client.errors import CreditdError, SessionClosed
from creditd_client.types import Authorization, Cutoff, Grant, LowCreditWarning, SessionEvent, SessionSummary
from creditd_client.v1 import common_pb2, metering_pb2

if TYPE_CHECKING:
    from creditd_client.aio import Client

log = logging.getLogger("creditd_client")
Callback = Callable[[Any], Awaitable[None] | None]
_END = object()


class VoiceSession:
    """An authorized call. Create it with `aio.Client.voice_session`.

    Events reach the worker as callbacks (`on_grant`, `on_warning`, `on_cutoff`, sync or async)
    and by `async for event in session`, which ends after the Cutoff or the SessionSummary.
    """

    def __init__(
        self,
        client: Client,
        session_id: str,
        client_id: str,
        authorization: Authorization,
        *,
        report_interval: float = 5.0,
        on_grant: Callback | None = None,
        on_warning: Callback | None = None,
        on_cutoff: Callback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not report_interval > 0:
            raise ValueError("report_interval must be positive")
        self.client = client
        self.session_id = session_id
        self.client_id = client_id
        self.authorization = authorization
        self.report_interval = report_interval
        self._callbacks: dict[type, Callback | None] = {
            Grant: on_grant,
            LowCreditWarning: on_warning,
            Cutoff: on_cutoff,
        }
        self._clock = clock
        self._answered_at: float | None = None
        self._stream: UsageStream | None = None
        self._reporter: asyncio.Task[None] | None = None
        self._stop_reports = asyncio.Event()
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._first_grant: asyncio.Event = asyncio.Event()
        self._last_reported = 0
        self.grant: Grant | None = None
        self.warning: LowCreditWarning | None = None
        self.cutoff: Cutoff | None = None
        self.summary: SessionSummary | None = None

    # -- state ---------------------------------------------------------------------------------

    @property
    def final(self) -> Final | None:
        """The Cutoff or SessionSummary that ended the session, once it has ended."""
        return self.cutoff or self.summary

    @property
    def ended(self) -> bool:
        return self.final is not None

    @property
    def granted_seconds(self) -> int:
        """Cumulative seconds the call may run, as last granted."""
        return self.grant.granted_seconds if self.grant else self.authorization.granted_seconds

    @property
    def reported_seconds(self) -> int:
        """The cumulative seconds last reported to the server."""
        return self._last_reported

    @property
    def elapsed(self) -> float:
        """Seconds since the call was answered."""
        return 0.0 if self._answered_at is None else self._clock() - self._answered_at

    # -- the call --------------------------------------------------------------------------------

    async def answer(self, timeout: float | None = None) -> Grant:
        """The call is answered: open the stream, start reporting, return the first grant."""
        if self._answered_at is not None:
            raise RuntimeError("answer() was called already; use resume() after a lost stream")
        self._answered_at = self._clock()
        return await self._start(timeout)

    async def resume(self, timeout: float | None = None) -> Grant:
        """Re-open a lost stream within the server's grace period (SessionStart again)."""
        if self._answered_at is None:
            raise RuntimeError("answer() first")
        if self.final is not None:
            raise SessionClosed(self.final_reason)
        if self._stream is not None:
            await self._stream.cancel()
        return await self._start(timeout)

    async def _start(self, timeout: float | None) -> Grant:
        self._first_grant.clear()
        self._stream = UsageStream(self.client._usage_stream(), self._dispatch, self._events.put_nowait)
        start = metering_pb2.SessionStart(
            session_id=self.session_id, client_id=self.client_id, channel=common_pb2.CHANNEL_VOICE
        )
        await self._stream.write(metering_pb2.StreamUsageRequest(start=start))
        if self._reporter is None or self._reporter.done():
            self._stop_reports.clear()
            self._reporter = asyncio.create_task(self._report(), name=f"creditd-report:{self.session_id}")
        granted = asyncio.create_task(self._first_grant.wait())
        ended = asyncio.create_task(self._stream.done.wait())
        try:
            await asyncio.wait(
                {granted, ended}, timeout=timeout or self.client.options.timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            granted.cancel()
            ended.cancel()
        if self._first_grant.is_set() and self.grant is not None:
            return self.grant
        if self.final is not None:
            raise SessionClosed(self.final_reason, "the session ended before it was granted any time")
        if self._stream.error is not None:
            raise self._stream.error
        raise deadline_exceeded(timeout or self.client.options.timeout)

    async def hang_up(self, seconds_used: int | None = None, timeout: float | None = None) -> Final:
        """End the call (SessionEnd) and return its settlement: the SessionSummary, or the
        Cutoff if the server cut the call first. `seconds_used` defaults to the seconds since
        `answer()`, a started second counting as a whole one."""
        if self.final is not None:
            await self._stop_reporting()
            return self.final
        if self._stream is None:
            raise RuntimeError("answer() first")
        await self._stop_reporting()
        seconds = math.ceil(self.elapsed) if seconds_used is None else seconds_used
        seconds = max(seconds, self._last_reported)
        end = metering_pb2.StreamUsageRequest(end=metering_pb2.SessionEnd(seconds_used=seconds))
        await self._stream.write(end)
        return await self._stream.wait(timeout or self.client.options.timeout)

    async def close(self) -> None:
        """Drop the stream without ending the session (the server settles it after its grace period)."""
        await self._stop_reporting()
        if self._stream is not None:
            await self._stream.cancel()
        self._events.put_nowait(_END)

    async def __aenter__(self) -> VoiceSession:
        return self

    async def __aexit__(self, *_: object) -> None:
        try:
            if self._stream is not None and self.final is None:
                with contextlib.suppress(CreditdError):
                    await self.hang_up()
        finally:
            await self.close()

    # -- events ------------------------------------------------------------------------------

    def __aiter__(self) -> VoiceSession:
        return self

    async def __anext__(self) -> SessionEvent:
        self._require_answered()
        item = await self._events.get()
        if item is _END:
            self._events.put_nowait(_END)  # every later iteration ends too
            raise StopAsyncIteration
        if isinstance(item, CreditdError):
            raise item  # the stream was lost: resume() and iterate again, or give up
        event: SessionEvent = item
        return event

    def _require_answered(self) -> None:
        """Events come from the stream that answer() opens: before it, none ever would."""
        if self._stream is None:
            raise RuntimeError(f"session {self.session_id}: answer() the call before iterating its events")

    @property
    def final_reason(self) -> str:
        return self.cutoff.reason if self.cutoff else "ENDED"

    async def _dispatch(self, event: SessionEvent) -> None:
        if isinstance(event, Grant):
            self.grant = event
            self._first_grant.set()
        elif isinstance(event, LowCreditWarning):
            self.warning = event
        elif isinstance(event, Cutoff):
            self.cutoff = event
        elif isinstance(event, SessionSummary):
            self.summary = event
        self._events.put_nowait(event)
        if self.final is not None:
            self._events.put_nowait(_END)
            self._stop_reports.set()
        callback = self._callbacks.get(type(event))
        if callback is not None:
            try:
                result = callback(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("the %s callback of session %s failed", type(event).__name__, self.session_id)

    async def _report(self) -> None:
        """Cumulative seconds, every `report_interval`, while the call lasts.

        It is stopped by an event, never cancelled: cancelling a write would cancel the call."""
        while self.final is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_reports.wait(), self.report_interval)
                return
            stream = self._stream
            if stream is None or stream.done.is_set():
                return
            seconds = max(self._last_reported, math.floor(self.elapsed))
            usage = metering_pb2.StreamUsageRequest(usage=metering_pb2.UsageReport(seconds_used=seconds))
            if await stream.write(usage):
                self._last_reported = seconds

    async def _stop_reporting(self) -> None:
        self._stop_reports.set()
        task, self._reporter = self._reporter, None
        if task is not None and task is not asyncio.current_task():
            await asyncio.wait({task}, timeout=self.client.options.timeout)  # a report may be in flight

    def __repr__(self) -> str:
        state = "ended" if self.ended else ("live" if self._answered_at is not None else "authorized")
        return f"VoiceSession({self.session_id!r}, {state}, granted={self.granted_seconds}s)"
