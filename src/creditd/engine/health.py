"""Whether this replica may take new work: its stores answer and it is not draining.

New sessions fail closed: while the hot store or the database cannot be reached, or while
the server drains for shutdown, Authorize and new streams get UNAVAILABLE. Live calls keep
renewing while the hot store answers and the write-behind is no more than
`max_unrecorded_seconds` behind; past that they end with their current grant.
"""

from __future__ import annotations

import asyncio
import contextlib
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
        self.rebuilding = False  # the hot store lost its data and is being rebuilt (store_ok is False)
        self.max_unrecorded_seconds = max_unrecorded_seconds
        self.lag: Callable[[], float] = lambda: 0.0

    @property
    def serving(self) -> bool:
        return self.store_ok and self.db_ok and not self.draining

    def require_serving(self) -> None:
        if self.draining:
            raise StoreUnavailable("the server is shutting down; use another replica", state="draining")
        if self.rebuilding:
            raise StoreUnavailable(
                "the hot store lost its data and is being rebuilt; nothing was granted", store="hot", state="rebuilding"
            )
        if not self.store_ok:
            raise StoreUnavailable("the hot store is unavailable; nothing was granted", store="hot")
        if not self.db_ok:
            raise StoreUnavailable("the database is unavailable; nothing was granted", store="database")

    def can_renew(self) -> bool:
        """A live call may reserve more while what it uses can still be recorded."""
        return self.store_ok and (self.db_ok or self.lag() < self.max_unrecorded_seconds)


class Monitor:
    """Pings both stores every `interval` seconds and reports changes of `serving`.

    `wake` checks at once instead (an operation found the hot store's data gone, or
    another replica said so): readiness goes NOT_SERVING before the rebuild starts, not
    up to an interval later, when another replica may have rebuilt the store already.
    Checks run one at a time.
    """

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
        self._lock = asyncio.Lock()
        self._reported = status.serving  # what on_change last said (the app sets readiness so at start)
        self._woken: asyncio.Task[None] | None = None
        self._wake_pending = False
        self._closed = False

    def start(self) -> None:
        self._periodic = self.clock.every(self._interval, self.check, "health-monitor")

    async def close(self) -> None:
        self._closed = True
        if self._periodic is not None:
            await self._periodic.stop()
        if self._woken is not None:
            self._woken.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._woken

    def wake(self, agency_id: str = "") -> None:
        """Check now, not at the next interval (a HotStore loss listener: `agency_id` is the
        agency an operation found without its state)."""
        if self._closed:
            return
        self._wake_pending = True
        if self._woken is None or self._woken.done():
            self._woken = self.clock.spawn(self._checks_now(), "health-check-now")

    async def _checks_now(self) -> None:
        while self._wake_pending and not self._closed:
            self._wake_pending = False  # a wake-up during this check asks for one more
            try:
                await self.check()
            except Exception:
                log.exception("health check failed")

    async def _report(self) -> None:
        serving = self.status.serving
        if serving != self._reported:
            self._reported = serving
            await self._on_change(serving)

    async def check(self) -> None:
        async with self._lock:
            await self._check()

    async def _check(self) -> None:
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
            # The hot store answers but lost what it held: not ready from now until it is
            # rebuilt (here or by another replica).
            self.status.store_ok = False
            self.status.rebuilding = True
            started = time.monotonic()
            try:
                await self._report()
                await self._on_store_lost()
            finally:
                self.status.rebuilding = False
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
        await self._report()

    def _too_slow(self, store: str) -> bool:
        """A ping that did not answer in time: an outage only after SLOW_PINGS in a row. On a
        busy process a slow answer is usually the event loop's delay, and refusing every new
        session for it would be a self-inflicted outage; a refused connection counts at once."""
        self._slow[store] += 1
        return self._slow[store] >= SLOW_PINGS
