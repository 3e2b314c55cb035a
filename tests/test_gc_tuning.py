"""The collector of `creditd serve`: young objects are collected and frozen on the loop's
timer, whatever CPython's allocation count says, so no collection walks more than one
interval's worth of objects; cycles are still freed, and frozen objects still die."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import AsyncIterator, Callable

import pytest

from creditd import gc_tuning

WAIT_SECONDS = 30.0  # generous: the machine may be busy


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


class Report:
    __slots__ = ("seconds",)

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds


def reports(generation: int) -> int:
    return sum(1 for o in gc.get_objects(generation) if type(o) is Report)


@pytest.fixture
async def collector() -> AsyncIterator[gc_tuning.Collector]:
    tuned = gc_tuning.tune()
    try:
        yield tuned
    finally:
        tuned.stop()


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def after_collections(collector: gc_tuning.Collector, count: int = 2) -> None:
    target = collector.collections + count
    await until(lambda: collector.collections >= target)


def tracked(obj: object) -> bool:
    """Whether a collection of any generation would walk `obj` (frozen objects it skips)."""
    return any(o is obj for generation in range(3) for o in gc.get_objects(generation))


async def test_a_cycle_made_after_start_is_freed_by_the_timer(collector: gc_tuning.Collector) -> None:
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    # Two nodes are far below the automatic trigger (20,000): only the timer collects them.
    assert gc.get_count()[0] < gc_tuning.YOUNG_THRESHOLD
    await until(lambda: gone() is None)


async def test_survivors_are_frozen_and_still_freed_when_dropped(collector: gc_tuning.Collector) -> None:
    frozen_before = gc.get_freeze_count()
    alive = [Node() for _ in range(5_000)]
    assert tracked(alive)
    await after_collections(collector)
    assert not tracked(alive) and not tracked(alive[-1])
    assert gc.get_freeze_count() >= frozen_before + len(alive)
    # Frozen is not immortal: reference counting frees it as before.
    node = Node()
    last = weakref.ref(node)
    await after_collections(collector)
    assert not tracked(node)
    del node
    assert last() is None


async def test_the_young_generation_stays_small_while_old_objects_are_replaced(
    collector: gc_tuning.Collector,
) -> None:
    """How a live call's pending read behaves: every report replaces old objects with new
    ones, so CPython's count (allocations minus deallocations) stays flat while the young
    generation grows; the timer collects it anyway."""
    slots = [Report(0) for _ in range(2_000)]
    await after_collections(collector)
    assert reports(0) == 0
    count_before = gc.get_count()[0]
    for seconds in range(1, 6):
        for i in range(len(slots)):
            slots[i] = Report(seconds)
    assert gc.get_count()[0] - count_before < len(slots)  # the count did not see 10,000 new objects
    assert reports(0) == len(slots)
    await after_collections(collector)
    assert reports(0) + reports(1) + reports(2) == 0


async def test_stop_gives_the_collector_back() -> None:
    threshold = gc.get_threshold()
    tuned = gc_tuning.tune()
    assert gc.get_threshold() == (gc_tuning.YOUNG_THRESHOLD, gc_tuning.MIDDLE_THRESHOLD, gc_tuning.OLD_THRESHOLD)
    assert gc.get_freeze_count() > 0
    tuned.stop()
    assert gc.get_threshold() == threshold
    assert gc.get_freeze_count() == 0
    assert not tuned.running


def test_a_long_collection_brings_the_next_one_forward_in_proportion() -> None:
    every, goal = gc_tuning.YOUNG_EVERY_SECONDS, gc_tuning.PAUSE_GOAL_SECONDS
    assert gc_tuning.next_delay(every, every, 2 * goal) == pytest.approx(every / 2)
    assert gc_tuning.next_delay(every, every / 2, 2 * goal) == pytest.approx(every / 4)
    assert gc_tuning.next_delay(every, every, 100 * goal) == pytest.approx(every / 4)  # never more often
    # Pauses back under the goal: the interval doubles back to `every`, no further.
    assert gc_tuning.next_delay(every, every / 4, goal / 2) == pytest.approx(every / 2)
    assert gc_tuning.next_delay(every, every / 2, goal / 2) == pytest.approx(every)
    assert gc_tuning.next_delay(every, every, 0.0) == pytest.approx(every)


async def test_the_timer_follows_the_pauses_it_measures(
    collector: gc_tuning.Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gc_tuning, "PAUSE_GOAL_SECONDS", 0.0)  # every collection is "long"
    await after_collections(collector, 3)
    assert collector.delay == pytest.approx(collector.every / 4)
    monkeypatch.setattr(gc_tuning, "PAUSE_GOAL_SECONDS", 3600.0)  # every collection is short
    await after_collections(collector, 3)
    assert collector.delay == pytest.approx(collector.every)
