"""Change notifications shared by every replica through Redis pub/sub.

Publishing never waits on Redis: messages are queued and sent in pipelined batches by a
background task, so the hot path pays no round trip for them. Every replica subscribes to
every channel and hands what arrives to its local subscribers, its own messages included.
A notification is a hint to look again (a balance, an account, new events); one lost while
Redis is away, or while a shard fails over, only delays a watcher until the next change.

On a standalone Redis this is one channel, "<prefix>bus" (PUBLISH/SUBSCRIBE). On a Redis
Cluster plain pub/sub would copy every message to every node; sharded pub/sub keeps a
message within the shard of its channel, so the bus uses SHARD_CHANNELS channels
"<prefix>bus:{<n>}" spread over the slots (SPUBLISH/SSUBSCRIBE). A notification goes to
the channel its name hashes to, so the load spreads over the shards. Each replica holds
one subscription per channel, on the primary that serves its slot, and follows the slot
when it moves (the server ends the subscription, or the connection drops).

Balance watches: a replica announces "watching:<account>" when a WatchBalance stream of
the account opens and every WATCH_ANNOUNCE_SECONDS while one is open; every replica
publishes the account's balance changes for WATCH_TTL_SECONDS after the last announcement
it received (see LocalBus.watch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from creditd.aio import raise_if_cancelled
from creditd.errors import StoreUnavailable
from creditd.store.bus import LocalBus
from creditd.store.redis_client import Routed, close, connect, pipelined

log = logging.getLogger(__name__)
MAX_QUEUED = 10_000
SHARD_CHANNELS = 16
RESUBSCRIBE_SECONDS = 0.5
WATCH_ANNOUNCE_SECONDS = 10.0
WATCH_TTL_SECONDS = 3 * WATCH_ANNOUNCE_SECONDS
WATCHING = "watching:"


class RedisBus(LocalBus):
    def __init__(self, url: str, prefix: str = "creditd:", *, cluster: bool = False) -> None:
        super().__init__()
        self._url = url
        self._redis = connect(url, cluster=cluster)
        self._cluster = cluster
        if cluster:
            self._channels = [f"{prefix}bus:{{{n}}}" for n in range(SHARD_CHANNELS)]
        else:
            self._channels = [f"{prefix}bus"]
        self._outgoing: asyncio.Queue[str] = asyncio.Queue(MAX_QUEUED)
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed: set[str] = set()
        self._all_subscribed = asyncio.Event()
        self._watched: dict[str, float] = {}  # account -> until when some replica watches it

    def channel_of(self, notification: str) -> str:
        """The Redis channel that carries `notification` (the same in every process)."""
        return self._channels[zlib.crc32(notification.encode()) % len(self._channels)]

    def _send(self, channel: str) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # a flood only merges wake-ups
            self._outgoing.put_nowait(channel)

    def watched(self, account_id: str) -> bool:
        until = self._watched.get(account_id)
        return until is not None and until > time.monotonic()

    def _started_watching(self, account_id: str) -> None:
        self._send(WATCHING + account_id)

    def deliver(self, channel: str) -> None:
        if channel.startswith(WATCHING):
            self._watched[channel[len(WATCHING) :]] = time.monotonic() + WATCH_TTL_SECONDS
            return
        super().deliver(channel)

    async def _announce(self) -> None:
        """Tell every replica, again and again, which balances this one watches."""
        while True:
            await asyncio.sleep(WATCH_ANNOUNCE_SECONDS)
            for account_id in list(self._watching):
                self._send(WATCHING + account_id)
            now = time.monotonic()
            self._watched = {account: until for account, until in self._watched.items() if until > now}

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._publish(), name="bus-send"),
            asyncio.create_task(self._announce(), name="bus-announce"),
        ]
        self._tasks += [asyncio.create_task(self._receive(c), name=f"bus-receive-{c}") for c in self._channels]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_subscribed.wait(), 5)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await close(self._redis)

    async def _publish(self) -> None:
        command = "SPUBLISH" if self._cluster else "PUBLISH"
        while True:
            batch = {await self._outgoing.get()}
            while not self._outgoing.empty() and len(batch) < 500:
                batch.add(self._outgoing.get_nowait())
            notifications = sorted(batch)
            channels = [self.channel_of(n) for n in notifications]
            commands = [Routed(c, (command, c, n)) for c, n in zip(channels, notifications, strict=True)]
            replies = await pipelined(self._redis, commands)
            failed = [n for n, reply in zip(notifications, replies, strict=True) if isinstance(reply, Exception)]
            if failed:  # Redis, or this shard, is away: deliver here at least
                log.warning("bus publish failed: %s", next(r for r in replies if isinstance(r, Exception)))
                for notification in failed:
                    self.deliver(notification)
                await asyncio.sleep(RESUBSCRIBE_SECONDS)
            raise_if_cancelled()

    async def _receive(self, channel: str) -> None:
        moved = False  # the channel's node may have changed since the topology was learnt
        while True:
            try:
                client = await self._subscriber(channel, moved)
                try:
                    await self._listen(client, channel)
                finally:
                    await client.aclose()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # once per outage: it is tried again every RESUBSCRIBE_SECONDS until it works
                level = logging.WARNING if channel in self._subscribed else logging.DEBUG
                log.log(level, "bus subscription to %s lost, subscribing again: %s", channel, exc)
            self._subscribed.discard(channel)
            moved = True
            await asyncio.sleep(RESUBSCRIBE_SECONDS)

    async def _listen(self, client: aioredis.Redis, channel: str) -> None:
        """Deliver what arrives until the subscription ends (on a cluster: its slot moved)."""
        async with client.pubsub() as pubsub:
            if self._cluster:
                await pubsub.ssubscribe(channel)
            else:
                await pubsub.subscribe(channel)
            raise_if_cancelled()
            async for message in pubsub.listen():
                kind = message.get("type")
                if kind in ("message", "smessage"):
                    self.deliver(str(message["data"]))
                elif kind in ("subscribe", "ssubscribe"):
                    self._subscribed.add(channel)
                    if len(self._subscribed) == len(self._channels):
                        self._all_subscribed.set()

    async def _subscriber(self, channel: str, moved: bool) -> aioredis.Redis:
        """A connection of its own (a subscription holds it) to the node serving `channel`.

        No socket timeout: an idle subscription is silent. No retries: a connection that
        fails makes the caller look up the channel's node again.
        """
        options: dict[str, Any] = dict(parse_url(self._url))
        options.update(decode_responses=True, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0))
        if isinstance(self._redis, aioredis.RedisCluster):
            if moved:
                await self._redis.nodes_manager.initialize()  # where the channel's slot is now
            await self._redis.initialize()
            node = self._redis.get_node_from_key(channel)
            if node is None:
                raise StoreUnavailable(f"no node serves the slot of {channel}")
            options.update(host=node.host, port=node.port)
        return aioredis.Redis(connection_pool=aioredis.ConnectionPool(**options))
