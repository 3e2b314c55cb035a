"""One timer heap for every live session of a process.

A session is in the heap at most once, at its next deadline (renewal, warning, cutoff,
end of the grace period, authorization expiry). Re-scheduling or cancelling a session
bumps its generation, so its older entries are dead and skipped when they come up; one
event-loop timer is armed for the earliest live entry. Due sessions are handed over in
batches of at most `batch` so that a burst (an agency pool running dry for thousands of
calls in the same second) never holds the event loop for long.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Protocol

from creditd.engine.clock import Clock, Timer


class Scheduled(Protocol):
    timer_gen: int


Entry = tuple[float, int, int, Scheduled]  # (when, order, generation, session)


class Scheduler:
    def __init__(self, clock: Clock, fire: Callable[[list[Scheduled]], None], batch: int = 256) -> None:
        self._clock = clock
        self._fire = fire
        self._batch = batch
        self._heap: list[Entry] = []
        self._order = itertools.count()
        self._live = 0  # entries whose generation is current
        self._timer: Timer | None = None
        self._armed_for = float("inf")

    def __len__(self) -> int:
        return self._live

    def schedule(self, session: Scheduled, when: float) -> None:
        """Make `when` the session's one deadline (replacing any earlier one)."""
        self.cancel(session)
        session.timer_gen = -session.timer_gen + 1
        heapq.heappush(self._heap, (when, next(self._order), session.timer_gen, session))
        self._live += 1
        if when < self._armed_for:
            self._arm(when)
        if len(self._heap) > 64 and len(self._heap) > 3 * self._live:
            self._compact()

    def cancel(self, session: Scheduled) -> None:
        """Forget the session's deadline, if it has one."""
        if session.timer_gen > 0:  # negative or 0: no live entry
            session.timer_gen = -session.timer_gen
            self._live -= 1

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_for = when
        self._timer = self._clock.call_at(when, self._run)

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if entry[2] == entry[3].timer_gen]
        heapq.heapify(self._heap)

    def _run(self) -> None:
        self._timer = None
        self._armed_for = float("inf")
        now = self._clock.now()
        due: list[Scheduled] = []
        heap = self._heap
        while heap and heap[0][0] <= now and len(due) < self._batch:
            _, _, generation, session = heapq.heappop(heap)
            if generation == session.timer_gen:
                session.timer_gen = -generation
                self._live -= 1
                due.append(session)
        while heap and heap[0][2] != heap[0][3].timer_gen:
            heapq.heappop(heap)
        if heap:
            # More due at once than one batch: the rest go in the next turn of the loop.
            self._arm(max(heap[0][0], now))
        if due:
            self._fire(due)
