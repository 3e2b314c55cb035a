"""asyncio helpers shared by every layer."""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Raise CancelledError in a task that was asked to stop but was not told.

    On Python 3.11, `asyncio.wait_for` returns its operation's result when a cancellation
    lands just as the operation completes, and the cancellation is lost. redis-py sends every
    command through `wait_for` (its socket timeout), so a background loop awaiting Redis can
    swallow the one cancel it gets at shutdown and run forever; such loops call this once
    per turn.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
