"""Garbage collection kept off the event loop's critical path.

CPython's cycle collector stops the whole process while it walks the objects of the
generations it collects. What makes that slow on a replica is not how many objects are
alive but how many are *young*, and CPython's trigger does not see them:

- a collection of the young generation is due after 700 (here: 20,000) more tracked
  objects were created than destroyed. A live call waiting for its next usage report
  holds about 13 objects of gRPC's pending read (coroutines, a future, callback wrappers);
  each report replaces them with new ones, so the young generation grows by 26,000
  objects a second at 10,000 calls reporting every 5 s while the count, which the old
  ones' deaths decrement, stays still. A young collection then walked 100,000-160,000
  objects: 70-180 ms, and a middle one 250-400 ms (measured, `bench/sessions.py`);
- a full collection walks every live call: 0.4-2.5 s at 10,000 calls.

So `tune()`, in `creditd serve` (not in processes that embed the server), does this:

- everything alive once the server has started is frozen (`gc.freeze()`): modules,
  classes, caches; collections never walk it again;
- every `YOUNG_EVERY_SECONDS`, the loop collects the young generations and freezes what
  survived. A collection then walks only what was created in the last tenth of a second
  (3.4-4.1 ms on average at 10,000 live calls and 200 new ones a second, at most 40-57 ms
  on a machine whose cores were full), and nothing is walked twice: the middle
  and old generations stay empty, so their collections cost nothing. A frozen object is
  still freed by reference counting when it is no longer used, which is how a call's
  objects go. What freezing cannot free is a cycle that was alive at a freeze and dies
  later, so a call's path must make none that outlives one step of the loop: errors set
  the call's status instead of raising gRPC's AbortError (whose traceback and the call's
  state hold each other), the write-behind builds its statements once, and gRPC's own
  cycle (its handler lookup, about 12 objects an RPC) is made and dropped within one
  step, where no freeze can find it. tests/api/test_garbage.py checks every kind of call;
  docs/operations.md gives what a run left;
- a collection's cost grows with what was created since the last one, so when one takes
  longer than `PAUSE_GOAL_SECONDS` (thousands of calls cut off or settled in the same
  second make ten times the usual garbage), the next one comes sooner, down to a quarter
  of the interval, and the interval grows back as the pauses shrink;
- the collector's own trigger stays on, at 20,000 allocations, for whatever the loop's
  timer cannot reach in time (a burst of allocations in one long step).
"""

from __future__ import annotations

import asyncio
import gc
import time

YOUNG_EVERY_SECONDS = 0.1  # how often the young generations are collected and frozen
YOUNG_THRESHOLD = 20_000  # allocations between automatic generation-0 collections (CPython: 700)
MIDDLE_THRESHOLD = 20  # generation-0 collections between generation-1 ones (CPython: 10)
OLD_THRESHOLD = 10  # generation-1 collections before a full one is considered (CPython: 10)
PAUSE_GOAL_SECONDS = 0.005  # a young collection longer than this brings the next one forward


class Collector:
    """The young collections of one event loop; `stop()` gives the collector back its
    CPython defaults (for processes that tune it only for a while, such as tests)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, every: float = YOUNG_EVERY_SECONDS) -> None:
        self.every = every
        self.delay = every  # until the next collection: `every`, or less after a long pause
        self.collections = 0
        self._loop = loop
        self._previous = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, OLD_THRESHOLD)
        self._handle: asyncio.TimerHandle | None = loop.call_later(every, self._collect)

    def _collect(self) -> None:
        started = time.perf_counter()
        gc.collect(1)  # generation 1 is empty unless the automatic trigger fired since
        gc.freeze()
        self.collections += 1
        self.delay = next_delay(self.every, self.delay, time.perf_counter() - started)
        self._handle = self._loop.call_later(self.delay, self._collect)

    @property
    def running(self) -> bool:
        return self._handle is not None

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        gc.set_threshold(*self._previous)
        gc.unfreeze()


def next_delay(every: float, delay: float, pause: float) -> float:
    """The wait before the next young collection, after one that took `pause` seconds
    `delay` seconds after the one before: shorter in proportion when the pause was over
    the goal (the garbage comes faster), back towards `every` when it was under."""
    if pause > PAUSE_GOAL_SECONDS:
        return max(every / 4, delay * PAUSE_GOAL_SECONDS / pause)
    return min(every, delay * 2)


def tune() -> Collector:
    """Collect and freeze young objects on the running loop (once per `creditd serve`)."""
    return Collector(asyncio.get_running_loop())
