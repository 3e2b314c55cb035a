"""Script calls of concurrent callers leave for Redis together.

Every caller that queues a script call in one turn of the event loop is sent in the same
pipeline (one per cluster node), so a busy replica pays one round trip for many calls
instead of one each. Each call stays its own atomic script; each caller awaits its own
reply, and a call that fails fails only its caller. While `max_in_flight` pipelines are
on their way, new calls wait and leave together in the next one, which is what makes the
batches grow with the load. A call queued alone is sent at once, as it is: a pipeline of
one costs more than a plain command.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

Call = tuple[str, list[str], list[str | int]]  # (script name, keys, args)
Runner = Callable[[Sequence[Call]], Awaitable[list[Any]]]


class ScriptBatcher:
    def __init__(
        self, run: Runner, run_one: Callable[[Call], Awaitable[Any]], max_batch: int = 256, max_in_flight: int = 4
    ) -> None:
        self._run = run
        self._run_one = run_one
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._queued: list[tuple[Call, asyncio.Future[Any]]] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._flush_scheduled = False
        self.batches = 0  # pipelines sent, and the calls they carried: the batch sizes achieved
        self.calls = 0

    async def call(self, name: str, keys: list[str], args: list[str | int]) -> Any:
        """The script's reply; raises what the call raised (StoreUnavailable when Redis or
        its node could not be reached)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append(((name, keys, args), future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._queued and len(self._in_flight) < self._max_in_flight:
            batch, self._queued = self._queued[: self._max_batch], self._queued[self._max_batch :]
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._in_flight.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if self._queued and not self._flush_scheduled:
            self._flush()

    async def _send(self, batch: list[tuple[Call, asyncio.Future[Any]]]) -> None:
        calls = [call for call, _ in batch]
        self.batches += 1
        self.calls += len(calls)
        try:
            if len(calls) == 1:
                replies: list[Any] = [await self._run_one(calls[0])]
            else:
                replies = await self._run(calls)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # every caller of the batch hears of it
            replies = [exc] * len(batch)
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # the caller went away
                continue
            if isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)
