"""Time for the engine: the wall clock of billing and the timers that drive live sessions.

Every time-driven rule (renewals, warnings, cutoffs, the grace period, authorization expiry,
the lease sweeper, health checks) reads time from one Clock. `RealClock` is the event
loop's; `ManualClock` moves only when told, so a test of a 60 s call runs in milliseconds
and always sees the same order of events.

Times are wall-clock seconds since the epoch (what `expires_at` and billing periods are
made of, and what replicas agree on); a timer is set for a wall time and runs on the event
loop's monotonic clock from the moment it is set.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(abc.ABC):
    @abc.abstractmethod
    def now(self) -> float:
        """Wall-clock seconds since the epoch."""

    @abc.abstractmethod
    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` on the event loop at wall time `when` (at once if it is past)."""

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run work that a timer started (a batch of renewals, settlements)."""
        return asyncio.get_running_loop().create_task(work, name=name)

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` on this clock."""
        done = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not done.done():
                done.set_result(None)

        timer = self.call_at(self.now() + seconds, wake)
        try:
            await done
        finally:
            timer.cancel()

    def every(self, interval: float, work: Callable[[], Awaitable[None]], name: str) -> Periodic:
        """Run `work` every `interval` seconds on this clock, one run at a time; a run that
        fails is logged and the next one comes on time."""
        periodic = Periodic(self, interval, work, name)
        periodic.start()
        return periodic


class RealClock(Clock):
    def now(self) -> float:
        return time.time()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        loop = asyncio.get_running_loop()
        return loop.call_at(loop.time() + (when - time.time()), callback)


class Periodic:
    """Repeated work on a clock (see Clock.every)."""

    def __init__(self, clock: Clock, interval: float, work: Callable[[], Awaitable[None]], name: str) -> None:
        self._clock = clock
        self._interval = interval
        self._work = work
        self._name = name
        self._timer: Timer | None = None
        self._running: asyncio.Task[None] | None = None
        self._stopped = False

    def start(self) -> None:
        self._timer = self._clock.call_at(self._clock.now() + self._interval, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if not self._stopped:
            self._running = self._clock.spawn(self._run(), self._name)

    async def _run(self) -> None:
        try:
            await self._work()
        except Exception:
            log.exception("%s failed; it runs again in %gs", self._name, self._interval)
        finally:
            self._running = None
            if not self._stopped:
                self.start()

    async def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        running = self._running
        if running is not None:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await running


class _ManualTimer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock(Clock):
    """A clock that moves only by `advance`, firing the timers it passes in order.

    After each timer it waits until the work that timers spawned has finished (store calls
    included), so what a test reads after `advance` is everything that time brought.
    """

    def __init__(self, start: float | None = None) -> None:
        # A whole second by default: tests that step in binary fractions of a second
        # (0.25, 0.5) then land exactly on the deadlines they aim at.
        self._now = float(int(time.time())) if start is None else start
        self._timers: list[tuple[float, int, _ManualTimer]] = []
        self._seq = itertools.count()
        self._work: set[asyncio.Task[None]] = set()

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = _ManualTimer(when, callback)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = super().spawn(work, name)
        self._work.add(task)
        task.add_done_callback(self._work.discard)
        return task

    async def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`, running every timer due on the way."""
        target = self._now + seconds
        await self.settle()
        while self._timers and self._timers[0][0] <= target:
            when, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._now = max(self._now, when)
            timer.callback()
            await self.settle()
        self._now = max(self._now, target)
        await self.settle()

    async def jump(self, seconds: float) -> None:
        """Move time forward by `seconds` at once, as a suspended machine does when it wakes:
        every timer due on the way fires once, seeing the new time (a periodic task then
        runs once, not once per interval missed)."""
        self._now += seconds
        await self.advance(0)

    async def settle(self) -> None:
        """Let the event loop run until no spawned work is left."""
        for _ in range(5):
            await asyncio.sleep(0)
        while self._work:
            await asyncio.wait(set(self._work))
            for _ in range(5):
                await asyncio.sleep(0)
