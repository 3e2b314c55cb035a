"""A primary of the Redis Cluster dies (SIGKILL) and its replica takes over, by itself.

The cluster here is this module's own (3 primaries, 3 replicas): each test kills a primary
and starts it again afterwards, when it rejoins as the replica of the one that replaced it.

* The client: commands for the dead primary's slots fail at once (StoreUnavailable) while
  the other shards answer; once the replica is promoted, the client follows it.
* The bus: its subscriptions move to the new primary and notifications flow again.
* `creditd serve` under traffic on agencies of every shard (live calls that renew, short
  calls, top-ups): no wallet below zero, no session billed beyond its grant, no
  acknowledged top-up lost, the victim shard's agencies served again after the failover,
  and `creditd reconcile` clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from creditd.domain.records import BalanceType, EventRecord, EventType, Record, new_id
from creditd.errors import StoreUnavailable
from creditd.store.redis import RedisHotStore
from creditd.store.redis_bus import RedisBus
from creditd.store.redis_client import ScriptCall, connect, ping_all, run_scripts
from tests import services
from tests.conftest import CREDIT, Api
from tests.crash.conftest import FAST
from tests.crash.procs import ADMIN_TOKEN, Ledger, Serve, creditd_env, free_port, open_channel, reconcile
from tests.crash.workload import LiveCall, Topups
from tests.redis_cluster import LocalRedisCluster, Node, running_cluster

COUNTER = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRedisCluster]:
    with running_cluster() as started:
        yield started


@contextlib.asynccontextmanager
async def killed(cluster: LocalRedisCluster, primary: Node, wait: bool = True) -> AsyncIterator[Node | None]:
    """SIGKILL `primary` (and, with `wait`, yield the replica promoted in its place); start it
    again afterwards, empty: it rejoins as a replica."""
    try:
        if wait:
            yield await asyncio.to_thread(cluster.kill_primary, primary)
        else:
            primary.kill()
            yield None
    finally:
        await asyncio.to_thread(cluster.restart, primary)


def spread(cluster: LocalRedisCluster, prefix: str, per_primary: int) -> dict[int, list[str]]:
    """Agency ids whose keys land on each primary: port -> agencies."""
    found: dict[int, list[str]] = {node.port: [] for node in cluster.primaries()}
    n = 0
    while any(len(agencies) < per_primary for agencies in found.values()):
        agency = f"ag{n}"
        owner = cluster.primary_for(f"{prefix}{{{agency}}}:").port
        if len(found[owner]) < per_primary:
            found[owner].append(agency)
        n += 1
    return found


async def test_a_dead_primary_fails_only_its_commands_and_the_client_follows_the_failover(
    cluster: LocalRedisCluster,
) -> None:
    prefix = services.new_redis_prefix()
    agencies = spread(cluster, prefix, 4)
    client = connect(cluster.url, cluster=True)
    counter = client.register_script(COUNTER)
    keys = {port: [f"{prefix}{{{a}}}:" for a in names] for port, names in agencies.items()}
    everywhere = [key for shard in keys.values() for key in shard]
    applied = dict.fromkeys(everywhere, 0)

    async def add(amount: int) -> list[object]:
        replies = await run_scripts(client, [ScriptCall(counter, [key], [amount]) for key in everywhere])
        for key, reply in zip(everywhere, replies, strict=True):
            if not isinstance(reply, Exception):
                applied[key] += amount
        return replies

    try:
        assert not any(isinstance(reply, Exception) for reply in await add(1))
        victim = cluster.primary_for(everywhere[0])
        replicas = cluster.replicas_of(victim)
        async with killed(cluster, victim, wait=False):
            with pytest.raises(StoreUnavailable):
                await ping_all(client)
            # before any replica is promoted: only the dead shard's calls fail, also on a client
            # that just failed to reach it (and so has to connect again)
            replies = dict(zip(everywhere, await add(10), strict=True))
            for port, shard in keys.items():
                for key in shard:
                    if port == victim.port:
                        assert isinstance(replies[key], StoreUnavailable), replies[key]
                    else:
                        assert replies[key] == applied[key], replies[key]
            await asyncio.to_thread(cluster.wait_promoted, replicas)
            # the client learns the new topology from its next errors, then every call goes through
            deadline = time.monotonic() + 15
            while any(isinstance(reply, Exception) for reply in await add(100)):
                assert time.monotonic() < deadline, "the client never followed the failover"
                await asyncio.sleep(0.1)
            await ping_all(client)
            # the promoted replica had every write its primary acknowledged; none applied twice
            values = await run_scripts(client, [ScriptCall(counter, [key], [0]) for key in everywhere])
            assert dict(zip(everywhere, values, strict=True)) == applied
    finally:
        await client.aclose()
        services.delete_redis_keys(prefix, cluster.url, cluster=True)


async def test_the_outbox_drains_from_the_shards_that_answer(cluster: LocalRedisCluster) -> None:
    prefix = services.new_redis_prefix()
    store = RedisHotStore(cluster.url, prefix, cluster=True)
    agencies = [agency for names in spread(cluster, prefix, 3).values() for agency in names]
    written: dict[str, str] = {}  # event id -> agency
    for agency in agencies:
        record = EventRecord(new_id(), agency, EventType.CUTOFF, BalanceType.VOICE, 0.0, session_id=agency)
        await store.append_records(agency, [record])
        written[record.event_id] = agency
    victim = cluster.primary_for(store._registry)  # the registry of agencies is away too
    on_victim = {a for a in agencies if cluster.primary_for(store._outbox_key(a)).port == victim.port}
    try:
        async with killed(cluster, victim, wait=False):
            taken = await store.take_records(1000)
            assert {written[r.event_id] for _, r in taken if isinstance(r, EventRecord)} == set(agencies) - on_victim
            await store.ack_records([outbox_id for outbox_id, _ in taken])
            deadline = time.monotonic() + 20
            rest: list[tuple[str, Record]] = []
            while not rest:  # once the replica is promoted
                assert time.monotonic() < deadline, "the failed-over shard's outbox was never drained"
                with contextlib.suppress(StoreUnavailable):
                    rest = await store.take_records(1000)
                await asyncio.sleep(0.1)
            assert {written[r.event_id] for _, r in rest if isinstance(r, EventRecord)} == on_victim
    finally:
        await store.close()
        services.delete_redis_keys(prefix, cluster.url, cluster=True)


async def test_the_bus_subscribes_again_on_the_promoted_replica(cluster: LocalRedisCluster) -> None:
    prefix = services.new_redis_prefix()
    sender, receiver = RedisBus(cluster.url, prefix, cluster=True), RedisBus(cluster.url, prefix, cluster=True)
    await sender.start()
    await receiver.start()
    try:
        notifications = [f"config:{uuid.uuid4().hex}" for _ in range(100)]
        victim = cluster.primary_for(receiver.channel_of(notifications[0]))
        on_victim = [n for n in notifications if cluster.primary_for(receiver.channel_of(n)).port == victim.port]
        async with killed(cluster, victim), receiver.subscribe(lambda c: c.startswith("config:")) as queue:
            # a notification sent while nobody listened on the new primary is lost (a hint):
            # send again until each one arrives
            seen: set[str] = set()
            deadline = time.monotonic() + 20
            while seen != set(on_victim):
                assert time.monotonic() < deadline, f"{len(set(on_victim) - seen)} notifications never arrived"
                for notification in set(on_victim) - seen:
                    await sender.publish(notification)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.3):
                        while True:
                            seen.add(await queue.get())
    finally:
        await sender.close()
        await receiver.close()


class ShortCalls:
    """One-second calls of one client, back to back: Authorize, SessionStart, SessionEnd(1)."""

    def __init__(self, api: Api, client_id: str) -> None:
        self.api = api
        self.client_id = client_id
        self.completed: list[float] = []  # monotonic time of each summary
        self.count = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            session_id = f"{self.client_id}-short-{self.count}"
            self.count += 1
            with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
                async with asyncio.timeout(5):
                    answer = await self.api.authorize(session_id, self.client_id)
                    if answer.allowed:
                        call, _ = await self.api.start_call(session_id, self.client_id)
                        if (await self.api.end_call(call, 1)).WhichOneof("msg") == "summary":
                            self.completed.append(time.monotonic())
            await asyncio.sleep(0.05)


async def _retry_until_acked(topups: Topups, within: float) -> None:
    """What a payment webhook does with an unanswered top-up: send it again, same key."""
    deadline = time.monotonic() + within
    while topups.failed:
        try:
            await topups.retry_failed()
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            assert time.monotonic() < deadline, f"top-ups still unanswered: {topups.failed}"
            await asyncio.sleep(0.2)


async def test_creditd_under_traffic_through_a_failover(
    cluster: LocalRedisCluster, postgres_template: str, tmp_path: Path
) -> None:
    database = services.create_database(postgres_template)
    database_url = services.postgres_url(database)
    prefix = services.new_redis_prefix()
    env = creditd_env(database_url, cluster.url, prefix, CREDITD_LISTEN=f"127.0.0.1:{free_port()}", **FAST)
    shards = spread(cluster, prefix, 2)
    agencies = [agency for names in shards.values() for agency in names]
    server = Serve(env, tmp_path / "serve.log")
    try:
        async with open_channel(server.address) as channel:
            api = Api(channel, ADMIN_TOKEN)
            for agency in agencies:
                await api.agency(agency)
                # the spender's free credits run out during the test: 18 s at one credit a minute
                await api.plan(agency, "p", free_voice_micros=3 * CREDIT // 10)
                await api.client(f"{agency}-spend", agency, "p")
                await api.client(f"{agency}-pay", agency, "p")
            live = [LiveCall(api, f"{agency}-live-{n}", f"{agency}-spend") for agency in agencies for n in range(2)]
            await asyncio.gather(*(call.open() for call in live))
            short = {agency: ShortCalls(api, f"{agency}-pay") for agency in agencies}
            topups = {agency: Topups(api, f"{agency}-pay", CREDIT // 4, f"{agency}-key") for agency in agencies}
            stop = asyncio.Event()
            traffic = [asyncio.create_task(s.run(stop)) for s in short.values()]
            traffic += [asyncio.create_task(t.run(stop, pause=0.05)) for t in topups.values()]
            await asyncio.sleep(2.0)

            victim = next(node for node in cluster.primaries() if node.port == next(iter(shards)))
            killed_at = time.monotonic()
            async with killed(cluster, victim):
                failed_over = time.monotonic()
                # the victim shard's agencies are served again: short calls complete after it
                victims = [short[agency] for agency in shards[victim.port]]
                deadline = time.monotonic() + 20
                while not all(any(t > failed_over for t in s.completed) for s in victims):
                    assert time.monotonic() < deadline, "the failed-over shard's agencies were never served again"
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)  # more traffic on the promoted replica
                stop.set()
                await asyncio.gather(*traffic)
                for call in live:
                    await call.end()
                    assert call.done, call.session_id
                for paying in topups.values():
                    await _retry_until_acked(paying, 20)
                # An Authorize whose answer was lost in the failover holds its slice until the
                # authorization expires (CREDITD_AUTHORIZE_TTL_SECONDS): wait for the release.
                accounts = [account for agency in agencies for account in (agency, f"{agency}-spend", f"{agency}-pay")]
                deadline = time.monotonic() + 30
                while True:
                    balances = {account: await api.balance(account) for account in accounts}
                    held = {a: b.voice.reserved_micros for a, b in balances.items() if b.voice.reserved_micros}
                    if not held:
                        break
                    assert time.monotonic() < deadline, f"reservations never released: {held}"
                    await asyncio.sleep(0.25)
        assert server.stop() == 0

        # no wallet below zero, nothing left reserved
        for account, balance in balances.items():
            for wallet in (balance.voice, balance.sms):
                assert min(wallet.free_micros, wallet.purchased_micros, wallet.available_micros) >= 0, account
                assert wallet.reserved_micros == 0, account
        ledger = Ledger(database_url)
        totals = ledger.balances()
        for (account, _), (free, purchased) in totals.items():
            assert free >= 0 and purchased >= 0, account
        # no session billed beyond what it was granted
        sessions = ledger.sessions()
        assert sessions and all(billed <= granted for _, granted, billed, _ in sessions.values()), sessions
        # every acknowledged top-up is in the ledger once, and the hot balance has all the ledger has
        keys = ledger.topup_keys()
        for agency, paying in topups.items():
            assert paying.acked and all(keys[key] == 1 for key in paying.acked), agency
            account = f"{agency}-pay"
            assert balances[account].voice.purchased_micros == totals[(account, 1)][1], account
        # Redis agrees with the ledger once the last records are written behind
        deadline = time.monotonic() + 30
        while (result := reconcile(env)).returncode != 0:
            assert time.monotonic() < deadline, result.stdout + result.stderr
        assert " 0 differences" in result.stdout, result.stdout
        around = {name: [t for t in calls.completed if t > killed_at - 1] for name, calls in short.items()}
        gaps = {name: max(b - a for a, b in itertools.pairwise(times)) for name, times in around.items()}
        print(
            f"\nfailover under traffic: cluster ok {failed_over - killed_at:.1f}s after the kill; longest pause"
            f" between short calls {max(gaps[a] for a in shards[victim.port]):.1f}s on the failed shard,"
            f" {max(g for a, g in gaps.items() if a not in shards[victim.port]):.1f}s on the others;"
            f" {sum(len(s.completed) for s in short.values())}"
            f" short calls, {sum(len(t.acked) for t in topups.values())} top-ups acknowledged"
        )
    finally:
        server.kill()
        services.drop_database(database)
        services.delete_redis_keys(prefix, cluster.url, cluster=True)
