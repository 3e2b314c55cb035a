"""A Redis connection that carries every concurrent caller's command at once.

The hot path's scripts go over one TCP connection to a standalone Redis: each command is
packed and queued, and what is queued is written with one write (so Redis reads it
together, a pipeline of concurrent callers) at the end of the turn of the event loop, or,
while an earlier write is still unanswered, as soon as its last reply arrives. A write
costs about 100 us of CPU on a loopback connection whatever it carries (the system call,
and the wake-up its replies bring), ten times a command's share, so under load the
batches grow instead of the writes; an idle connection still writes at once. Replies,
which Redis sends in order, are handed to their callers' futures as they are parsed
(hiredis).
There is no pool to take a connection from, no task per command and no timeout object per
read: a round trip of redis-py costs about 150 us of CPU, a command here a tenth of that.

A connection that breaks or does not answer in `timeout` seconds fails every command in
flight with StoreUnavailable (their outcome is unknown: the scripts are idempotent where
it matters, see creditd.store.redis) and is replaced on the next command. There is never
more than one connection at a time, and each one answers only the commands written on it:
a reply is matched to its caller by its place in that connection's stream, so a second
connection (or a stray reply) would hand every caller from then on the reply of another
command.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis.asyncio.connection import parse_url

from creditd.errors import StoreUnavailable
from creditd.store.redis_client import pack


class ReplyError(Exception):
    """An error reply of Redis (a script error, NOSCRIPT, ...)."""


def supports(url: str) -> bool:
    """Whether `url` is a plain TCP Redis this module can talk to (not TLS, not a socket)."""
    return url.startswith("redis://")


class _Protocol(asyncio.Protocol):
    """One TCP connection: the commands written on it, in order, await its replies."""

    def __init__(self, owner: RespConnection) -> None:
        self._owner = owner
        self._reader = hiredis.Reader(encoding="utf-8", replyError=ReplyError)
        self.transport: asyncio.Transport | None = None
        # Callers of the commands written on this connection and when they were queued: a
        # reply read here can only answer a command sent here, whatever happens to others.
        self.pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        pending = self.pending
        while (reply := self._reader.gets()) is not False:
            if not pending:  # a reply nobody asked for: the stream is out of step
                self._owner.fail(StoreUnavailable("unexpected reply from Redis"), self)
                return
            future = pending.popleft()[0]
            if not future.done():
                if isinstance(reply, ReplyError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        self._owner.answered(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._owner.fail(StoreUnavailable(f"the connection to Redis was lost: {exc or 'closed'}"), self)

    def fail(self, error: StoreUnavailable) -> None:
        """Fail every command in flight here (its outcome is unknown) and drop the connection."""
        pending, self.pending = self.pending, collections.deque()
        for future, _ in pending:
            if not future.done():
                future.set_exception(error)
        if self.transport is not None and not self.lost:
            self.transport.abort()


class RespConnection:
    def __init__(self, url: str, *, connect_timeout: float = 1.0, timeout: float = 2.0) -> None:
        options = parse_url(url)
        self._host = str(options.get("host", "127.0.0.1"))
        self._port = int(options.get("port", 6379))
        self._setup: list[list[str | int]] = []
        if options.get("password"):
            auth: list[str | int] = ["AUTH", str(options["password"])]
            if options.get("username"):
                auth.insert(1, str(options["username"]))
            self._setup.append(auth)
        if int(options.get("db", 0)):
            self._setup.append(["SELECT", int(options["db"])])
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._protocol: _Protocol | None = None  # the connection new commands go to
        self._connecting: asyncio.Future[None] | None = None
        # Commands not written yet: their bytes, callers and when they were queued.
        self._queued: list[bytes] = []
        self._waiting: list[tuple[asyncio.Future[Any], float]] = []
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self.writes = 0  # writes made and commands sent: the batch sizes achieved
        self.commands = 0

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._protocol.transport if self._protocol is not None else None

    @property
    def pending(self) -> collections.deque[tuple[asyncio.Future[Any], float]]:
        """Commands sent on the current connection and not answered yet."""
        return self._protocol.pending if self._protocol is not None else collections.deque()

    async def call(self, args: Sequence[str | int]) -> Any:
        """The reply of one command; ReplyError for an error reply, StoreUnavailable when
        Redis could not be reached or did not answer in time."""
        if self._protocol is None:
            await self._connect()
            if self._protocol is None:  # opened, and lost again already
                raise StoreUnavailable("the connection to Redis was lost; nothing was sent")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queued.append(pack(args))
        self._waiting.append((future, time.monotonic()))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._timeout, self._check_timeout)
        return await future

    async def _connect(self) -> None:
        """Open the connection, once for every caller that waits for it."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            await asyncio.shield(connecting)
        finally:
            # Only this attempt's own waiters forget it: one that wakes up late must not
            # forget the next attempt, which would let two connections open at once.
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(self), self._host, self._port), self._connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"the Redis hot store is unavailable: {exc}", error=type(exc).__name__) from exc
        if self._protocol is not None:  # never two at once: keep the one in use
            protocol.fail(StoreUnavailable("a second connection to Redis"))
            return
        if protocol.lost:  # closed by Redis before it could be used
            raise StoreUnavailable("the connection to Redis was closed at once")
        self._protocol = protocol
        for command in self._setup:
            await self.call(command)

    def _flush(self) -> None:
        self._flush_scheduled = False
        protocol = self._protocol
        if not self._queued:
            return
        if protocol is None or protocol.transport is None:
            self._fail_queued(StoreUnavailable("the connection to Redis was lost; nothing was sent"))
            return
        if protocol.pending:
            return  # written with the last reply of the write in flight (answered)
        self.writes += 1
        self.commands += len(self._queued)
        data, self._queued = b"".join(self._queued), []
        protocol.pending.extend(self._waiting)
        self._waiting = []
        protocol.transport.write(data)

    def answered(self, protocol: _Protocol) -> None:
        if protocol is not self._protocol or protocol.pending:
            return
        if self._waiting:
            self._flush()
        elif self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _oldest(self) -> float | None:
        times = [entries[0][1] for entries in (self.pending, self._waiting) if entries]
        return min(times) if times else None

    def _check_timeout(self) -> None:
        self._watchdog = None
        oldest = self._oldest()
        if oldest is None:
            return
        age = time.monotonic() - oldest
        if age >= self._timeout:
            self.fail(StoreUnavailable(f"Redis did not answer within {self._timeout:g}s"))
        else:
            self._watchdog = asyncio.get_running_loop().call_later(self._timeout - age, self._check_timeout)

    def _fail_queued(self, error: StoreUnavailable) -> None:
        waiting, self._waiting, self._queued = self._waiting, [], []
        for future, _ in waiting:
            if not future.done():
                future.set_exception(error)

    def fail(self, error: StoreUnavailable, protocol: _Protocol | None = None) -> None:
        """Fail what is in flight on `protocol` (by default the current connection) and drop
        it; when it is the current one, what is queued fails too (it was never sent) and
        the next command opens a new connection."""
        if protocol is None:
            protocol = self._protocol
        if protocol is None:
            self._fail_queued(error)
            return
        current = protocol is self._protocol
        if current:
            self._protocol = None
            self._fail_queued(error)
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
        protocol.fail(error)

    def close(self) -> None:
        self.fail(StoreUnavailable("the hot store is closing"))
