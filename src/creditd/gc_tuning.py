"""Garbage collection kept off the event loop's critical path.

CPython's cycle collector stops the whole process while it walks the objects of the
generations it collects. A replica with 10,000 live calls holds about a million tracked
objects (gRPC's per-stream state above all); a full (generation-2) collection over them
took 0.4-2.5 s, and every timer due meanwhile (cutoffs included) fired that late.

What `tune()` does, in `creditd serve` (not in processes that embed the server):
- everything alive once the server has started is frozen (`gc.freeze()`): modules,
  classes, caches; collections never walk it again;
- after every full collection, what survived it is frozen too. Live calls' objects are
  freed by reference counting when the calls end (they form no cycles: measured with
  `gc.DEBUG_SAVEALL` over thousands of calls), so a frozen object still goes away when
  it is no longer used; what freezing costs is that a cycle formed later by objects frozen
  now is never collected (gRPC's handler lookup leaves a cycle of six small objects per
  RPC, alive for a moment: the few that a freeze catches in flight are kept for good, a
  few kilobytes an hour). Each full collection then walks only what was created since the
  previous one, not every live call;
- young collections come after 20,000 allocations instead of 700. Each frees the garbage
  of many short calls at once and measured 20-115 ms with 200 new calls a second beside
  10,000 live ones; the default thresholds collected 30 times as often for no better
  cutoff timing and twice the collection time (docs/benchmarks.md).
"""

from __future__ import annotations

import gc
from typing import Any

YOUNG_THRESHOLD = 20_000  # allocations between generation-0 collections (CPython: 700)
MIDDLE_THRESHOLD = 20  # generation-0 collections between generation-1 ones (CPython: 10)
OLD_THRESHOLD = 10  # generation-1 collections before a full one is considered (CPython: 10)

_tuned = False


def tune() -> None:
    """Freeze the start-up heap and keep full collections small (once per process)."""
    global _tuned
    if _tuned:
        return
    _tuned = True
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, OLD_THRESHOLD)
    gc.callbacks.append(_freeze_survivors)


def _freeze_survivors(phase: str, info: dict[str, Any]) -> None:
    if phase == "stop" and info.get("generation") == 2:
        gc.freeze()
