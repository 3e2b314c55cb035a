"""Change notifications between the parts of one replica (and, on Redis, between replicas).

Channels: "balance:<account>" (a balance changed), "config:<account>" (the account or its
plan changed: caches drop it and live sessions re-check it), "events" (new events are in
the database), "apikey:<key id>" (a key was revoked).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable


class LocalBus:
    """Fan-out to the subscribers of this process."""

    def __init__(self) -> None:
        self._subscribers: list[tuple[Callable[[str], bool], asyncio.Queue[str]]] = []

    async def publish(self, channel: str) -> None:
        self.notify(channel)

    def notify(self, channel: str) -> None:
        """Publish without waiting (from timers and other code that cannot await)."""
        self.deliver(channel)

    def deliver(self, channel: str) -> None:
        for wants, queue in list(self._subscribers):
            if wants(channel) and queue.qsize() < 1000:  # a stalled watcher only misses wake-ups
                queue.put_nowait(channel)

    @contextlib.asynccontextmanager
    async def subscribe(self, wants: Callable[[str], bool]) -> AsyncIterator[asyncio.Queue[str]]:
        entry: tuple[Callable[[str], bool], asyncio.Queue[str]] = (wants, asyncio.Queue())
        self._subscribers.append(entry)
        try:
            yield entry[1]
        finally:
            self._subscribers.remove(entry)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
