"""The redis-py client of the Redis stores: one standalone Redis, or a Redis Cluster.

`CREDITD_REDIS_MODE` is auto (the default), standalone or cluster. Auto asks the node
that CREDITD_REDIS_URL names (`INFO cluster`): a node with cluster_enabled:1 is a member
of a cluster, which a cluster client then discovers from it.

On a cluster every command goes to the primary of its key's hash slot; `pipelined` sends
commands as one pipeline per primary, all at once, so a batch costs one round trip of the
slowest primary, and a primary that is down fails only the commands it owns.

Neither client retries a command (a script whose reply was lost could apply twice if it
ran again); a cluster client that meets a connection error learns the topology again
before its next command, which is how it follows a failover.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rx
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.typing import EncodableT

from creditd.errors import StoreUnavailable

REDIS_MODES = ("auto", "standalone", "cluster")
Client = aioredis.Redis | aioredis.RedisCluster
MAX_CONNECTIONS = 256  # per node

UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    rx.ConnectionError,  # also BusyLoadingError, MaxConnectionsError
    rx.TimeoutError,
    rx.ReadOnlyError,
    rx.MasterDownError,
    rx.OutOfMemoryError,
    rx.ClusterDownError,  # the cluster is failing over, or lost a shard
    rx.SlotNotCoveredError,
    rx.TryAgainError,
    OSError,  # also the builtin TimeoutError
)


def unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"the Redis hot store is unavailable: {exc}", error=type(exc).__name__)


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    try:
        yield
    except UNAVAILABLE_ERRORS as exc:
        raise unavailable(exc) from exc


async def is_cluster(url: str, mode: str = "auto") -> bool:
    """Whether `url` names a node of a Redis Cluster (asked only in the auto mode)."""
    if mode not in REDIS_MODES:
        raise ValueError(f"CREDITD_REDIS_MODE must be auto, standalone or cluster, not {mode!r}")
    if mode != "auto":
        return mode == "cluster"
    probe = aioredis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0, decode_responses=True)
    try:
        with redis_errors():
            info = await probe.info("cluster")
    finally:
        await probe.aclose()
    return bool(info.get("cluster_enabled"))


def connect(url: str, *, cluster: bool, **options: Any) -> Client:
    """A client that fails fast: short timeouts and no retries, so an outage is seen at once."""
    settings: dict[str, Any] = {
        "socket_connect_timeout": 1.0,
        "socket_timeout": 2.0,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": MAX_CONNECTIONS,
    }
    settings.update(options)
    settings["decode_responses"] = True
    if cluster:
        return aioredis.RedisCluster.from_url(url, **settings)
    # A pool that waits (up to `timeout` seconds) for a free connection: redis-py's
    # default pool raises MaxConnectionsError at once when its connections are all busy,
    # which turned a burst of concurrent calls into UNAVAILABLE answers.
    settings.setdefault("timeout", 2.0)
    return aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(url, **settings))


async def close(client: Client) -> None:
    if isinstance(client, aioredis.RedisCluster):
        await client.aclose()
    else:
        await client.aclose(close_connection_pool=True)  # the pool was given, so not closed by default


async def ping_all(client: Client) -> None:
    """PING every primary; raises StoreUnavailable if one does not answer."""
    with redis_errors():
        if isinstance(client, aioredis.RedisCluster):
            await client.ping(target_nodes=aioredis.RedisCluster.PRIMARIES)
        else:
            await client.ping()


async def ping_any(client: aioredis.RedisCluster) -> None:
    """PING every primary of a cluster; raises StoreUnavailable only if none answers."""
    errors: list[BaseException] = []
    with redis_errors():
        await client.initialize()  # learns the topology once, or again after an error
    for node in client.get_primaries():
        try:
            with redis_errors():
                await client.ping(target_nodes=node)
            return
        except StoreUnavailable as exc:
            errors.append(exc)
    raise errors[0] if errors else unavailable(OSError("the cluster has no primary"))


@dataclass(frozen=True, slots=True)
class Routed:
    """A command and the key that decides which node runs it."""

    key: str
    args: tuple[EncodableT, ...]


async def pipelined(client: Client, commands: Sequence[Routed]) -> list[Any]:
    """Run commands as one non-transactional pipeline per node, the nodes in parallel.

    Returns, in order, each command's reply or its own exception: StoreUnavailable for
    every command of a node that could not be reached, the error Redis answered otherwise.
    (redis-py's cluster pipeline groups by node too, but a node it cannot connect to
    fails the whole pipeline.)
    """
    if not commands:
        return []
    groups: dict[str, list[int]] = {}
    if isinstance(client, aioredis.RedisCluster):
        try:
            await client.initialize()  # learns the topology once, or again after an error
        except UNAVAILABLE_ERRORS as exc:  # no node answers
            return [unavailable(exc)] * len(commands)
        for i, command in enumerate(commands):
            try:
                node = client.get_node_from_key(command.key)
            except UNAVAILABLE_ERRORS:  # a slot nobody serves for now: the pipeline says so
                node = None
            groups.setdefault(node.name if node else "", []).append(i)
    else:
        groups[""] = list(range(len(commands)))

    async def run(indexes: list[int]) -> list[Any]:
        if isinstance(client, aioredis.Redis):
            return await _packed_pipeline(client, [commands[i].args for i in indexes])
        pipe = client.pipeline(transaction=False)
        for i in indexes:
            pipe.execute_command(*commands[i].args)
        return list(await pipe.execute(raise_on_error=False))

    if len(groups) == 1:  # the common case needs no task per node
        only = next(iter(groups.values()))
        outcomes: list[list[Any] | BaseException] = []
        try:
            outcomes.append(await run(only))
        except Exception as exc:
            outcomes.append(exc)
    else:
        outcomes = await asyncio.gather(*(run(indexes) for indexes in groups.values()), return_exceptions=True)
    replies: list[Any] = [None] * len(commands)
    for indexes, outcome in zip(groups.values(), outcomes, strict=True):
        if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
            raise outcome  # cancelled
        for n, i in enumerate(indexes):
            reply = outcome if isinstance(outcome, Exception) else outcome[n]
            replies[i] = unavailable(reply) if isinstance(reply, UNAVAILABLE_ERRORS) else reply
    if isinstance(client, aioredis.RedisCluster) and any(isinstance(r, StoreUnavailable) for r in replies):
        # A cluster pipeline that cannot reach a node does not make the client learn the
        # topology again (single commands do): ask now, so a promoted replica is found.
        with contextlib.suppress(*UNAVAILABLE_ERRORS):
            await client.nodes_manager.initialize()
    return replies


def pack(args: Sequence[str | int]) -> bytes:
    """One command in the Redis protocol. redis-py's own packing of a script call with its
    thirty-odd arguments costs four times as much, a large share of a call's CPU."""
    texts = list(map(str, args))
    body = "".join([f"${len(text)}\r\n{text}\r\n" for text in texts])
    if not body.isascii():  # lengths are of bytes
        body = "".join([f"${len(text.encode())}\r\n{text}\r\n" for text in texts])
    return f"*{len(texts)}\r\n{body}".encode()


async def _packed_pipeline(client: aioredis.Redis, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Commands written at once on one connection of the pool, then each reply read in turn:
    what redis-py's pipeline does, with the packing above. An error reply is returned in its
    command's place; a connection that fails (or a read cut short) is closed, not reused."""
    pool: Any = client.connection_pool  # redis-py leaves get_connection untyped
    connection = await pool.get_connection()
    try:
        await connection.send_packed_command(b"".join(pack(args) for args in commands))
        replies: list[Any] = []
        callbacks = client.response_callbacks  # how redis-py shapes a command's reply (XRANGE, ...)
        for args in commands:
            try:
                reply = await connection.read_response()
            except rx.ResponseError as error:
                replies.append(error)
                continue
            callback = callbacks.get(str(args[0]).upper())
            replies.append(callback(reply) if callback is not None else reply)
    except BaseException:
        await connection.disconnect()
        raise
    finally:
        await pool.release(connection)
    return replies


@dataclass(frozen=True, slots=True)
class ScriptCall:
    script: AsyncScript
    keys: Sequence[str]  # all in one hash slot
    args: Sequence[EncodableT]


async def run_scripts(client: Client, calls: Sequence[ScriptCall]) -> list[Any]:
    """Run scripts by EVALSHA as `pipelined` commands; each call's reply or exception, in order.

    A script the server does not have (a new primary after a failover, SCRIPT FLUSH) is
    loaded and only the calls that answered NOSCRIPT run again: they did not run at all.
    """

    def evalsha(call: ScriptCall) -> Routed:
        return Routed(call.keys[0], ("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args))

    replies: list[Any] = [None] * len(calls)
    sent = list(range(len(calls)))
    if isinstance(client, aioredis.RedisCluster):
        # A call across slots fails alone (in a pipeline it would fail its node's batch).
        for i, call in enumerate(calls):
            if len({client.keyslot(key) for key in call.keys}) > 1:
                replies[i] = rx.RedisClusterException(f"the keys of one script call span slots: {call.keys}")
        sent = [i for i in sent if replies[i] is None]
    for i, reply in zip(sent, await pipelined(client, [evalsha(calls[i]) for i in sent]), strict=True):
        replies[i] = reply
    missing = [i for i, reply in enumerate(replies) if isinstance(reply, rx.NoScriptError)]
    if missing:
        scripts = {id(calls[i].script): calls[i].script for i in missing}
        try:
            with redis_errors():
                for script in scripts.values():
                    await client.script_load(script.script)
        except StoreUnavailable as exc:
            for i in missing:
                replies[i] = exc
            return replies
        again = await pipelined(client, [evalsha(calls[i]) for i in missing])
        for i, reply in zip(missing, again, strict=True):
            replies[i] = reply
    return replies
