"""Event-loop stalls and garbage-collection pauses, measured cheaply enough to stay on in
production.

Everything on a replica shares one event loop: while a callback runs without yielding (a
slow handler, a blocking call, a long garbage collection), every timer is late, cutoffs
included, and every RPC waits. Two probes show it:

- a heartbeat: a loop callback due every `HEARTBEAT_SECONDS`, recording how late it fires.
  A tick late by L means the loop was held for at least L (a stall of D shows as a
  lateness between D - HEARTBEAT_SECONDS and D);
- `gc.callbacks`: the time each collection takes, by generation (a collection holds the
  whole process, whichever thread triggered it).

Metrics, as named for Prometheus:

- `creditd_event_loop_lateness_seconds` (histogram) and `creditd_event_loop_lateness_max_seconds`
  (the worst since start)
- `creditd_gc_pause_seconds{generation}` (histogram), `creditd_gc_pause_max_seconds{generation}`
  (the longest since start) and `creditd_gc_collections_total{generation}` (all collections)

Cost: 50 heartbeats a second (5-9 us of Python each) and two callbacks per collection
(under 1 us together). Generation-0 collections come by the hundred or thousand a second
under load (about one per two Authorize calls) and most take well under a millisecond, so
only those of `GEN0_RECORDED_FROM` or more go into the histogram (all go into the max and
the count): recording each one into OpenTelemetry (5-9 us) would cost more than they do. A
collection is timed inside the GC callback but handed to the histogram on the next
heartbeat: recording into OpenTelemetry from inside a collection could re-enter one of its
locks in the thread that holds it.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

HEARTBEAT_SECONDS = 0.02
# Finer than the telemetry's default buckets around the 20 ms that matters for cutoffs.
PAUSE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
GENERATIONS = (0, 1, 2)
GEN0_RECORDED_FROM = 0.001


class StallWatch:
    """The heartbeat and the GC timer of one process; `start()` on the event loop to watch."""

    def __init__(self, meter: Meter, interval: float = HEARTBEAT_SECONDS) -> None:
        self.interval = interval
        self.lateness_max = 0.0
        self.gc_pause_max = [0.0 for _ in GENERATIONS]
        self._lateness = meter.create_histogram(
            "creditd.event_loop.lateness",
            unit="s",
            description="How late the event loop's heartbeat fired: time the loop was held by work that did not yield",
            explicit_bucket_boundaries_advisory=PAUSE_BUCKETS,
        )
        self._gc_pause = meter.create_histogram(
            "creditd.gc.pause",
            unit="s",
            description="Garbage collections, by generation: how long each held the process",
            explicit_bucket_boundaries_advisory=PAUSE_BUCKETS,
        )
        meter.create_observable_gauge(
            "creditd.event_loop.lateness.max",
            callbacks=[self._observe_lateness_max],
            unit="s",
            description="The latest the event loop's heartbeat has fired since the process started",
        )
        meter.create_observable_gauge(
            "creditd.gc.pause.max",
            callbacks=[self._observe_gc_max],
            unit="s",
            description="The longest garbage collection since the process started, by generation",
        )
        meter.create_observable_counter(
            "creditd.gc.collections",
            callbacks=[self._observe_collections],
            description="Garbage collections since the process started, by generation",
        )
        self._generation_labels = [{"generation": str(g)} for g in GENERATIONS]
        self._gc_started = 0.0
        self._gc_pending: list[tuple[int, float]] = []  # (generation, seconds) not yet recorded
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        """Start both probes; called on the event loop they watch."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._due = self._loop.time() + self.interval
        self._handle = self._loop.call_at(self._due, self._tick)
        gc.callbacks.append(self._on_gc)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        self._record_gc_pauses()
        self._loop = None

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        late = max(0.0, now - self._due)
        self._lateness.record(late)
        if late > self.lateness_max:
            self.lateness_max = late
        self._record_gc_pauses()
        self._due = now + self.interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_started
        generation = info["generation"]
        if took > self.gc_pause_max[generation]:
            self.gc_pause_max[generation] = took
        if generation or took >= GEN0_RECORDED_FROM:
            self._gc_pending.append((generation, took))

    def _record_gc_pauses(self) -> None:
        if not self._gc_pending:
            return
        pending, self._gc_pending = self._gc_pending, []
        record, labels = self._gc_pause.record, self._generation_labels
        for generation, took in pending:
            record(took, labels[generation])

    def _observe_lateness_max(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self.lateness_max)]

    def _observe_gc_max(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(took, self._generation_labels[g]) for g, took in enumerate(self.gc_pause_max)]

    def _observe_collections(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(stats["collections"], self._generation_labels[g]) for g, stats in enumerate(gc.get_stats())]
