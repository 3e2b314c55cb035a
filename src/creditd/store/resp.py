"""A Redis connection that carries every concurrent caller's command at once.

The hot path's scripts go over one TCP connection to a standalone Redis: each command is
packed and queued, the commands queued in one turn of the event loop are written with one
write (so Redis reads them together, a pipeline of concurrent callers), and replies, which
Redis sends in order, are handed to their callers' futures as they are parsed (hiredis).
There is no pool to take a connection from, no task per command and no timeout object per
read: a round trip of redis-py costs about 150 us of CPU, a command here a tenth of that.

A connection that breaks or does not answer in `timeout` seconds fails every command in
flight with StoreUnavailable (their outcome is unknown: the scripts are idempotent where
it matters, see creditd.store.redis) and is replaced on the next command.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Sequence
from typing import Any

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
    def __init__(self, owner: RespConnection) -> None:
        self._owner = owner
        self._reader = hiredis.Reader(encoding="utf-8", replyError=ReplyError)
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def _current(self) -> bool:
        """Whether this is still the owner's connection (not one it replaced)."""
        return self.transport is not None and self._owner.transport is self.transport

    def data_received(self, data: bytes) -> None:
        if not self._current():
            return
        self._reader.feed(data)
        pending = self._owner.pending
        while (reply := self._reader.gets()) is not False:
            if not pending:  # a reply nobody asked for: the stream is out of step
                self._owner.fail(StoreUnavailable("unexpected reply from Redis"))
                return
            future = pending.popleft()[0]
            if not future.done():
                if isinstance(reply, ReplyError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        self._owner.answered()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._current():
            self._owner.fail(StoreUnavailable(f"the connection to Redis was lost: {exc or 'closed'}"))


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
        self.transport: asyncio.Transport | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._queued: list[bytes] = []
        self._flush_scheduled = False
        self.pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self.writes = 0  # writes made and commands sent: the batch sizes achieved
        self.commands = 0

    async def call(self, args: Sequence[str | int]) -> Any:
        """The reply of one command; ReplyError for an error reply, StoreUnavailable when
        Redis could not be reached or did not answer in time."""
        if self.transport is None:
            await self._connect()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queued.append(pack(args))
        self.pending.append((future, time.monotonic()))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._timeout, self._check_timeout)
        return await future

    async def _connect(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            await asyncio.shield(connecting)
        finally:
            if connecting.done():
                self._connecting = None

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(self), self._host, self._port), self._connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"the Redis hot store is unavailable: {exc}", error=type(exc).__name__) from exc
        self.transport = transport
        for command in self._setup:
            await self.call(command)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._queued and self.transport is not None:
            self.writes += 1
            self.commands += len(self._queued)
            data, self._queued = b"".join(self._queued), []
            self.transport.write(data)

    def answered(self) -> None:
        if not self.pending and self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _check_timeout(self) -> None:
        self._watchdog = None
        if not self.pending:
            return
        age = time.monotonic() - self.pending[0][1]
        if age >= self._timeout:
            self.fail(StoreUnavailable(f"Redis did not answer within {self._timeout:g}s"))
        else:
            self._watchdog = asyncio.get_running_loop().call_later(self._timeout - age, self._check_timeout)

    def fail(self, error: StoreUnavailable) -> None:
        """Fail what is in flight and drop the connection (the next command opens a new one)."""
        transport, self.transport = self.transport, None
        self._queued = []
        pending, self.pending = self.pending, collections.deque()
        for future, _ in pending:
            if not future.done():
                future.set_exception(error)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if transport is not None:
            transport.abort()

    def close(self) -> None:
        self.fail(StoreUnavailable("the hot store is closing"))
