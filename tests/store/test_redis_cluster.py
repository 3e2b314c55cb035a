"""The Redis store and bus on a Redis Cluster of 3 primaries and 3 replicas (the session's
`redis_cluster`), where what differs from one Redis is routing: every agency in one slot,
agencies on every shard, commands grouped per node, sharded pub/sub.

The contract of the hot store runs on the cluster too (tests/store/test_hot_store_contract.py);
what a failover does is in tests/crash/test_redis_cluster_failover.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rx

from creditd.domain.periods import period_bounds_epoch
from creditd.domain.records import BalanceType, EventRecord, EventType, new_id
from creditd.domain.wallet import WalletConfig, WalletState
from creditd.store.redis import RedisHotStore
from creditd.store.redis_bus import SHARD_CHANNELS, RedisBus
from creditd.store.redis_client import ScriptCall, connect, is_cluster, run_scripts
from tests import services
from tests.crash.procs import RedisServer
from tests.redis_cluster import LocalRedisCluster

T0 = 1_705_312_800.0
VOICE = BalanceType.VOICE
AGENCIES = [f"agency-{n}" for n in range(24)]
# Adds ARGV[2] to KEYS[1] and answers the new value; ARGV[1] == "fail" answers an error instead.
COUNTER = """
if ARGV[1] == 'fail' then return redis.error_reply('ERR asked to fail') end
return {KEYS[1], redis.call('INCRBY', KEYS[1], ARGV[2])}
"""


@pytest.fixture
async def cluster_store(redis_cluster: LocalRedisCluster) -> AsyncIterator[RedisHotStore]:
    prefix = services.new_redis_prefix()
    store = RedisHotStore(redis_cluster.url, prefix, cluster=True)
    try:
        yield store
    finally:
        await store.close()
        services.delete_redis_keys(prefix, redis_cluster.url, cluster=True)


def owners(cluster: LocalRedisCluster, keys: list[str]) -> dict[str, int]:
    """key -> port of the primary serving its slot."""
    return {key: cluster.primary_for(key).port for key in keys}


async def test_the_url_of_any_node_is_detected_as_a_cluster(redis_cluster: LocalRedisCluster) -> None:
    for node in redis_cluster.nodes:  # primaries and replicas alike
        assert await is_cluster(f"redis://{node.address}/0")
    assert not await is_cluster(services.REDIS_URL)
    assert await is_cluster(services.REDIS_URL, "cluster")  # forced: not asked
    assert not await is_cluster(f"redis://{redis_cluster.nodes[0].address}/0", "standalone")
    with pytest.raises(ValueError, match="CREDITD_REDIS_MODE"):
        await is_cluster(services.REDIS_URL, "sentinel")


async def test_every_key_of_an_agency_is_in_its_slot_and_agencies_reach_every_shard(
    redis_cluster: LocalRedisCluster, cluster_store: RedisHotStore
) -> None:
    store = cluster_store
    for agency in AGENCIES:
        for account in (agency, f"{agency}-client"):
            await store.configure_wallet(agency, account, VOICE, WalletConfig(), T0, new_agency=True)
        record = EventRecord(new_id(), agency, EventType.CUTOFF, VOICE, T0, session_id="s")
        await store.append_records(agency, [record])
    client = aioredis.RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    try:
        keys = [key async for key in client.scan_iter(match=f"{store._prefix}*", count=1000)]
        slots = {key: client.keyslot(key) for key in keys}
    finally:
        await client.aclose()
    for agency in AGENCIES:
        tagged = {key for key in keys if key.startswith(f"{store._prefix}{{{agency}}}:")}
        assert tagged >= {
            store._wallet_key(agency, agency, VOICE),
            store._wallet_key(agency, f"{agency}-client", VOICE),
            store._outbox_key(agency),
        }
        assert len({slots[key] for key in tagged}) == 1, tagged
    primaries = {node.port for node in redis_cluster.primaries()}
    outboxes = [store._outbox_key(agency) for agency in AGENCIES]
    assert set(owners(redis_cluster, outboxes).values()) == primaries


async def test_the_outbox_is_drained_from_every_shard(
    redis_cluster: LocalRedisCluster, cluster_store: RedisHotStore
) -> None:
    written = {}
    for agency in AGENCIES:
        record = EventRecord(new_id(), agency, EventType.CUTOFF, VOICE, T0, session_id=agency)
        await cluster_store.append_records(agency, [record])
        written[record.event_id] = record
    # another replica, which wrote nothing: its first call sweeps the registry of agencies
    other = RedisHotStore(redis_cluster.url, cluster_store._prefix, cluster=True)
    try:
        taken = await other.take_records(1000)
        assert {r.event_id: r for _, r in taken if isinstance(r, EventRecord)} == written
        await other.ack_records([outbox_id for outbox_id, _ in taken])
        assert await other.take_records(1000) == []
        assert await cluster_store.take_records(1000) == []
    finally:
        await other.close()


async def test_load_replaces_every_shards_agencies_and_markers_tell_which_are_there(
    redis_cluster: LocalRedisCluster, cluster_store: RedisHotStore
) -> None:
    store = cluster_store
    assert await store.ping()  # a cluster is up while a primary answers; losses show per agency
    assert await store.agencies_present(AGENCIES) == set()
    for agency in AGENCIES:
        await store.configure_wallet(agency, f"{agency}-old", VOICE, WalletConfig(), T0, new_agency=True)
    assert await store.agencies_present(AGENCIES) == set(AGENCIES)
    start, end = period_bounds_epoch(T0, 1)
    wallets = [
        (agency, WalletState(agency, VOICE, WalletConfig(), start, end, purchased_micros=n))
        for n, agency in enumerate(AGENCIES)
    ]
    await store.load(wallets, [])
    assert await store.agencies_present(AGENCIES) == set(AGENCIES)
    for n, agency in enumerate(AGENCIES):
        assert await store.read_wallet(agency, f"{agency}-old", VOICE, T0) is None  # replaced
        loaded = await store.read_wallet(agency, agency, VOICE, T0)
        assert loaded is not None and loaded.purchased_micros == n


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
async def test_run_scripts_answers_each_call_in_order_with_its_own_error(
    kind: str, request: pytest.FixtureRequest
) -> None:
    cluster = kind == "redis-cluster"
    own = RedisServer()  # a Redis of our own: this test flushes the script cache
    if cluster:
        url = request.getfixturevalue("redis_cluster").url
    else:
        own.start()
        url = own.url
    prefix = services.new_redis_prefix()
    client = connect(url, cluster=cluster)
    try:
        counter = client.register_script(COUNTER)
        keys = [f"{prefix}{{{agency}}}:n" for agency in AGENCIES]
        calls = [ScriptCall(counter, [key], ["fail" if n % 5 == 0 else "add", n]) for n, key in enumerate(keys)]
        replies = await run_scripts(client, calls)
        for n, (key, reply) in enumerate(zip(keys, replies, strict=True)):
            if n % 5 == 0:
                assert isinstance(reply, rx.ResponseError) and "asked to fail" in str(reply)
            else:
                assert reply == [key, n]
        # a server without the script (a new primary, SCRIPT FLUSH): loaded, and each call runs once
        await client.script_flush()
        again = await run_scripts(client, [ScriptCall(counter, [key], ["add", 1000]) for key in keys])
        assert again == [[key, n + 1000 if n % 5 else 1000] for n, key in enumerate(keys)]
        # keys of two slots in one call: that call fails, the others go through, even on its node
        mixed = ScriptCall(counter, [keys[0], keys[1]], ["add", 1])
        sibling = keys[0].replace(":n", ":m")  # the slot, and so the node, of keys[0]
        crossed, fine = await run_scripts(client, [mixed, ScriptCall(counter, [sibling], ["add", 1])])
        assert isinstance(crossed, Exception if cluster else list)
        assert fine == [sibling, 1]
    finally:
        await client.aclose()
        services.delete_redis_keys(prefix, url, cluster)
        own.close()


async def test_the_hot_store_runs_its_scripts_by_name(cluster_store: RedisHotStore) -> None:
    for agency in AGENCIES[:6]:
        await cluster_store.configure_wallet(
            agency, agency, VOICE, WalletConfig(free_allowance_micros=0), T0, new_agency=True
        )
    common = cluster_store._common(T0, [1])
    store = cluster_store
    calls = [
        ("read_wallet", [store._wallet_key(a, account, VOICE), store._outbox_key(a), store._agency_marker(a)], common)
        for a, account in [*((a, a) for a in AGENCIES[:6]), (AGENCIES[0], "nobody"), ("gone", "gone")]
    ]
    replies = await store.run_scripts(calls)
    assert [reply[:2] for reply in replies[:6]] == [["OK", a] for a in AGENCIES[:6]]
    assert replies[6] == ["NONE"]  # the agency is there, the wallet is not
    assert replies[7] == ["LOST"]  # no state of the agency at all


async def test_notifications_reach_every_replica_over_every_shard(redis_cluster: LocalRedisCluster) -> None:
    prefix = services.new_redis_prefix()
    sender = RedisBus(redis_cluster.url, prefix, cluster=True)
    receiver = RedisBus(redis_cluster.url, prefix, cluster=True)
    await sender.start()
    await receiver.start()
    try:
        notifications = [f"config:{uuid.uuid4().hex}" for _ in range(200)]
        channels = {sender.channel_of(n) for n in notifications}
        assert len(channels) == SHARD_CHANNELS
        primaries = {node.port for node in redis_cluster.primaries()}
        assert set(owners(redis_cluster, sorted(channels)).values()) == primaries
        async with receiver.subscribe(lambda channel: channel.startswith("config:")) as queue:
            for notification in notifications:
                await sender.publish(notification)
            seen: set[str] = set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    while seen != set(notifications):
                        seen.add(await queue.get())
        assert seen == set(notifications)
        # sharded: plain pub/sub carries none of it
        with redis_cluster.primaries()[0].client() as node:
            assert node.execute_command("PUBSUB", "CHANNELS", f"{prefix}*") == []
            assert len(node.execute_command("PUBSUB", "SHARDCHANNELS", f"{prefix}*")) > 0
    finally:
        await sender.close()
        await receiver.close()
