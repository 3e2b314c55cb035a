"""Whether this replica may take new work: its stores answer and it is not draining.

New sessions fail closed: while the hot store or the database cannot be reached, or while
the server drains for shutdown, Authorize and new streams get UNAVAILABLE. Live calls keep
renewing while the hot store answers and the write-behind is no more than
`max_unrecorded_seconds` behind; past that they end with their current grant.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from creditd.engine.clock import Clock, Periodic
from creditd.errors import StoreUnavailable

log = logging.getLogger(__name__)
SLOW_PINGS = 3  # unanswered pings in a row that make a store count as unavailable


class Status:
    def __init__(self, max_unrecorded_seconds: float = 30.0) -> None:
        self.store_ok = True
        self.db_ok = True
        self.draining = False
        self.max_unrecorded_seconds = max_unrecorded_seconds
        self.lag: Callable[[], float] = lambda: 0.0

    @property
    def serving(self) -> bool:
        return self.store_ok and self.db_ok and not self.draining

    def require_serving(self) -> None:
        if self.draining:
            raise StoreUnavailable("the server is shutting down; use another replica", state="draining")
        if not self.store_ok:
            raise StoreUnavailable("the hot store is unavailable; nothing was granted", store="hot")
        if not self.db_ok:
            raise StoreUnavailable("the database is unavailable; nothing was granted", store="database")

    def can_renew(self) -> bool:
        """A live call may reserve more while what it uses can still be recorded."""
        return self.store_ok and (self.db_ok or self.lag() < self.max_unrecorded_seconds)


class Monitor:
    """Pings both stores every `interval` seconds and reports changes of `serving`."""

    def __init__(
        self,
        clock: Clock,
        status: Status,
        ping_store: Callable[[], Awaitable[bool | None]],
        ping_db: Callable[[], Awaitable[None]],
        on_change: Callable[[bool], Awaitable[None]],
        on_store_lost: Callable[[], Awaitable[None]],
        lost_agencies: Callable[[], Awaitable[set[str]]],
        on_agencies_lost: Callable[[set[str]], Awaitable[None]],
        interval: float = 1.0,
    ) -> None:
        self.clock = clock
        self.status = status
        self._ping_store = ping_store
        self._ping_db = ping_db
        self._on_change = on_change
        self._on_store_lost = on_store_lost
        self._lost_agencies = lost_agencies
        self._on_agencies_lost = on_agencies_lost
        self._interval = interval
        self._periodic: Periodic | None = None
        self._slow = {"store": 0, "database": 0}  # unanswered pings in a row

    def start(self) -> None:
        self._periodic = self.clock.every(self._interval, self.check, "health-monitor")

    async def close(self) -> None:
        if self._periodic is not None:
            await self._periodic.stop()

    async def check(self) -> None:
        before = self.status.serving
        intact = False
        try:
            intact = await asyncio.wait_for(self._ping_store(), self._interval) is not False
            self.status.store_ok = True
            self._slow["store"] = 0
        except TimeoutError:
            intact = True  # not known to be lost
            if self._too_slow("store"):
                self.status.store_ok = False
                log.warning("hot store unavailable: %d pings unanswered within %gs", SLOW_PINGS, self._interval)
        except (StoreUnavailable, OSError) as exc:
            self.status.store_ok = False
            log.warning("hot store unavailable: %s", exc)
        if self.status.store_ok and not intact:
            # The hot store answers but lost what it held: rebuild it before serving again.
            self.status.store_ok = False
            started = time.monotonic()
            await self._on_store_lost()
            self.status.store_ok = True
            log.warning("hot store rebuilt from the database in %.2fs", time.monotonic() - started)
        elif self.status.store_ok:
            # Some agencies' state alone is gone (a cluster shard that came back empty): only
            # they are rebuilt, and the replica goes on serving the others.
            try:
                lost = await self._lost_agencies()
            except StoreUnavailable as exc:
                log.warning("hot store unavailable: %s", exc)
                lost = set()
            if lost:
                started = time.monotonic()
                await self._on_agencies_lost(lost)
                log.warning(
                    "state of %d agencies rebuilt from the database in %.2fs", len(lost), time.monotonic() - started
                )
        try:
            await asyncio.wait_for(self._ping_db(), self._interval)
            self.status.db_ok = True
            self._slow["database"] = 0
        except TimeoutError:
            if self._too_slow("database"):
                self.status.db_ok = False
                log.warning("database unavailable: %d pings unanswered within %gs", SLOW_PINGS, self._interval)
        except (StoreUnavailable, OSError) as exc:
            self.status.db_ok = False
            log.warning("database unavailable: %s", exc)
        if self.status.serving != before:
            await self._on_change(self.status.serving)

    def _too_slow(self, store: str) -> bool:
        """A ping that did not answer in time: an outage only after SLOW_PINGS in a row. On a
        busy process a slow answer is usually the event loop's delay, and refusing every new
        session for it would be a self-inflicted outage; a refused connection counts at once."""
        self._slow[store] += 1
        return self._slow[store] >= SLOW_PINGS
