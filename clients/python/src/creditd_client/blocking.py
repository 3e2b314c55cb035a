"""Voice sessions and SMS senders for the blocking client.

    with creditd_client.Client() as client:
        with client.voice_session("call-1", "dental-1") as session:
            session.answer()
            for event in session:          # Grant, LowCreditWarning, then Cutoff or SessionSummary
                ...
        with client.sms_sender("dental-1") as sender:
            sender.send("msg-1", "US")

A session is a stream that must be read while the call lasts and a timer that reports its
usage: the blocking client runs the asyncio sessions on an event loop of its own, in a
background thread, and waits for them. Callbacks (`on_grant`, `on_warning`, `on_cutoff`)
run on that thread: keep them short.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from creditd_client._stream import Final
from creditd_client.sms import SmsSender
from creditd_client.types import Authorization, Cutoff, Grant, LowCreditWarning, SessionEvent, SessionSummary, SmsResult
from creditd_client.voice import VoiceSession

T = TypeVar("T")


class EventLoopThread:
    """An asyncio event loop in a daemon thread; `run` waits for a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="creditd-client-sessions", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class BlockingVoiceSession:
    """An authorized call driven from blocking code: `VoiceSession` without `await`."""

    def __init__(self, loop: EventLoopThread, session: VoiceSession) -> None:
        self._loop = loop
        self.session = session  # the asyncio session it drives

    @property
    def session_id(self) -> str:
        return self.session.session_id

    @property
    def authorization(self) -> Authorization:
        return self.session.authorization

    @property
    def grant(self) -> Grant | None:
        return self.session.grant

    @property
    def warning(self) -> LowCreditWarning | None:
        return self.session.warning

    @property
    def cutoff(self) -> Cutoff | None:
        return self.session.cutoff

    @property
    def summary(self) -> SessionSummary | None:
        return self.session.summary

    @property
    def final(self) -> Final | None:
        return self.session.final

    @property
    def granted_seconds(self) -> int:
        return self.session.granted_seconds

    def answer(self, timeout: float | None = None) -> Grant:
        return self._loop.run(self.session.answer(timeout))

    def resume(self, timeout: float | None = None) -> Grant:
        return self._loop.run(self.session.resume(timeout))

    def hang_up(self, seconds_used: int | None = None, timeout: float | None = None) -> Final:
        return self._loop.run(self.session.hang_up(seconds_used, timeout))

    def close(self) -> None:
        self._loop.run(self.session.close())

    def __enter__(self) -> BlockingVoiceSession:
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.run(self.session.__aexit__(None, None, None))

    def __iter__(self) -> BlockingVoiceSession:
        return self

    def __next__(self) -> SessionEvent:
        try:
            return self._loop.run(self.session.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def __repr__(self) -> str:
        return f"Blocking{self.session!r}"


class BlockingSmsSender:
    """An SMS stream driven from blocking code: `SmsSender` without `await`."""

    def __init__(self, loop: EventLoopThread, sender: SmsSender) -> None:
        self._loop = loop
        self.sender = sender  # the asyncio sender it drives

    @property
    def closed(self) -> bool:
        return self.sender.closed

    @property
    def final(self) -> Final | None:
        return self.sender.final

    def open(self) -> None:
        self._loop.run(self.sender.open())

    def send(
        self, message_id: str, destination_country: str, segments: int = 1, *, timeout: float | None = None
    ) -> SmsResult:
        return self._loop.run(self.sender.send(message_id, destination_country, segments, timeout=timeout))

    def close(self, timeout: float | None = None) -> Final:
        return self._loop.run(self.sender.close(timeout))

    def __enter__(self) -> BlockingSmsSender:
        self.open()
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.run(self.sender.__aexit__(None, None, None))
