"""Change notifications shared by every replica through Redis pub/sub.

Publishing never waits on Redis: messages are queued and sent in pipelined batches by a
background task, so the hot path pays no round trip for them. Every replica subscribes to
one channel and hands what arrives to its local subscribers, its own messages included.
A notification is a hint to look again (a balance, an account, new events); one lost while
Redis is away only delays a watcher until the next change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis

from creditd.store.bus import LocalBus

log = logging.getLogger(__name__)
MAX_QUEUED = 10_000


class RedisBus(LocalBus):
    def __init__(self, url: str, prefix: str = "creditd:") -> None:
        super().__init__()
        self._redis = aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=1.0)
        self._channel = f"{prefix}bus"
        self._outgoing: asyncio.Queue[str] = asyncio.Queue(MAX_QUEUED)
        self._tasks: list[asyncio.Task[None]] = []

    async def publish(self, channel: str) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # a flood only merges wake-ups
            self._outgoing.put_nowait(channel)

    async def start(self) -> None:
        ready = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._send(), name="bus-send"),
            asyncio.create_task(self._receive(ready), name="bus-receive"),
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready.wait(), 5)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._redis.aclose()

    async def _send(self) -> None:
        while True:
            batch = {await self._outgoing.get()}
            while not self._outgoing.empty() and len(batch) < 500:
                batch.add(self._outgoing.get_nowait())
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for channel in batch:
                        pipe.publish(self._channel, channel)
                    await pipe.execute()
            except Exception as exc:  # Redis is away: deliver here at least
                log.warning("bus publish failed: %s", exc)
                for channel in batch:
                    self.deliver(channel)
                await asyncio.sleep(0.5)

    async def _receive(self, ready: asyncio.Event) -> None:
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel)
                    ready.set()
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self.deliver(str(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("bus subscription lost, reconnecting: %s", exc)
                await asyncio.sleep(0.5)
