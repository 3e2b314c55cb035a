"""Server streams (WatchBalance, WatchEvents) as iterators that can be cancelled.

Opening a watch is retried on UNAVAILABLE until its first message arrives (it is a read);
after that a broken stream raises, since a new one would not replay what was missed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc

from creditd_client._base import Retrier
from creditd_client.errors import from_rpc_error

T = TypeVar("T")


class Watch(Iterator[T], Generic[T]):
    """A sync watch: iterate it; `cancel()` (or leaving a `with` block) ends it."""

    def __init__(self, start: Callable[[], Any], convert: Callable[[Any], T], retrier: Retrier) -> None:
        self._start = start
        self._convert = convert
        self._retrier = retrier
        self._call: Any = None
        self._received = False
        self._cancelled = False

    def __iter__(self) -> Watch[T]:
        return self

    def __next__(self) -> T:
        while not self._cancelled:
            if self._call is None:
                self._retrier.attempt += 1
                self._call = self._start()
            try:
                message = next(self._call)
            except grpc.RpcError as exc:
                if self._cancelled or exc.code() is grpc.StatusCode.CANCELLED:
                    break
                error = from_rpc_error(exc)
                delay = None if self._received else self._retrier.next_delay(error)
                if delay is None:
                    raise error from exc
                self._call = None
                time.sleep(delay)
                continue
            self._received = True
            return self._convert(message)
        raise StopIteration

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    def __enter__(self) -> Watch[T]:
        return self

    def __exit__(self, *_: object) -> None:
        self.cancel()


class AsyncWatch(AsyncIterator[T], Generic[T]):
    """An asyncio watch: `async for` over it; `cancel()` (or leaving `async with`) ends it."""

    def __init__(self, start: Callable[[], Any], convert: Callable[[Any], T], retrier: Retrier) -> None:
        self._start = start
        self._convert = convert
        self._retrier = retrier
        self._call: Any = None
        self._received = False
        self._cancelled = False

    def __aiter__(self) -> AsyncWatch[T]:
        return self

    async def __anext__(self) -> T:
        while not self._cancelled:
            if self._call is None:
                self._retrier.attempt += 1
                self._call = self._start()
            try:
                message = await self._call.read()
            except grpc.RpcError as exc:
                if self._cancelled or exc.code() is grpc.StatusCode.CANCELLED:
                    break
                error = from_rpc_error(exc)
                delay = None if self._received else self._retrier.next_delay(error)
                if delay is None:
                    raise error from exc
                self._call = None
                await asyncio.sleep(delay)
                continue
            if message is grpc.aio.EOF:
                break
            self._received = True
            return self._convert(message)
        raise StopAsyncIteration

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    async def __aenter__(self) -> AsyncWatch[T]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()
