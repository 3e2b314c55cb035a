"""Change notifications between the parts of one replica (and, on Redis, between replicas).

Channels: "balance:<account>" (a balance changed), "config:<account>" (the account or its
plan changed: caches drop it and live sessions re-check it), "events" (new events are in
the database), "apikey:<key id>" (a key was revoked).

Balances change on every call, and only a WatchBalance stream wants to hear of it: a
"balance:" notification is published only while some replica watches that account
(`watch`); otherwise it costs a dictionary lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

BALANCE = "balance:"


class LocalBus:
    """Fan-out to the subscribers of this process."""

    def __init__(self) -> None:
        self._subscribers: list[tuple[Callable[[str], bool], asyncio.Queue[str]]] = []
        self._watching: dict[str, int] = {}  # account -> balance watches open in this process

    async def publish(self, channel: str) -> None:
        self.notify(channel)

    def notify(self, channel: str) -> None:
        """Publish without waiting (from timers and other code that cannot await)."""
        if channel.startswith(BALANCE) and not self.watched(channel[len(BALANCE) :]):
            return
        self._send(channel)

    def _send(self, channel: str) -> None:
        self.deliver(channel)

    def watched(self, account_id: str) -> bool:
        """Whether a balance watch of the account is open (on a shared bus: on any replica)."""
        return account_id in self._watching

    @contextlib.asynccontextmanager
    async def watch(self, account_id: str) -> AsyncIterator[None]:
        """Hold while a caller watches the account's balance: its changes are published."""
        self._watching[account_id] = self._watching.get(account_id, 0) + 1
        self._started_watching(account_id)
        try:
            yield
        finally:
            left = self._watching[account_id] - 1
            if left:
                self._watching[account_id] = left
            else:
                del self._watching[account_id]

    def _started_watching(self, account_id: str) -> None:
        return None

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
