"""What one script call costs through creditd's Redis client, alone or pipelined, on one
Redis and on a Redis Cluster of 3 primaries (and 3 replicas).

A tiny script (INCR of one key) isolates the client and round-trip costs from the work of
creditd's own scripts. Keys belong to many agencies (hash tags), so a cluster batch has
commands for every primary. Reported per case: wall time and this process's CPU time per
call (the CPU is what a creditd process pays on its one core).

    python bench/redis_pipeline.py                       # the machine's Redis, and a cluster it starts
    python bench/redis_pipeline.py --cluster-url redis://127.0.0.1:7000/0

Needs redis-server and redis-cli on PATH for the cluster it starts (tests/redis_cluster.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import Iterator

from common import REDIS_URL, ROOT

from creditd.store.redis_client import Client, ScriptCall, close, connect, run_scripts

TINY = "return redis.call('INCR', KEYS[1])"
BATCHES = (1, 16, 64, 256)


@contextlib.contextmanager
def cluster_url(given: str) -> Iterator[str]:
    if given:
        yield given
        return
    sys.path.insert(0, str(ROOT))
    from tests.redis_cluster import running_cluster

    with running_cluster() as cluster:
        yield cluster.url


async def measure(client: Client, calls: int) -> list[tuple[str, float, float]]:
    script = client.register_script(TINY)
    prefix = f"creditd-bench-{uuid.uuid4().hex[:8]}:"
    keys = [f"{prefix}{{agency-{n}}}:n" for n in range(512)]
    await run_scripts(client, [ScriptCall(script, [key], []) for key in keys])  # load, connect, warm up
    rows = []
    wall, cpu = time.perf_counter(), time.process_time()
    for n in range(calls):
        await script(keys=[keys[n % len(keys)]])
    rows.append(("one EVALSHA per await", time.perf_counter() - wall, time.process_time() - cpu))
    for size in BATCHES:
        batch = [ScriptCall(script, [keys[n % len(keys)]], []) for n in range(size)]
        rounds = max(1, calls // size)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(rounds):
            replies = await run_scripts(client, batch)
        assert not any(isinstance(reply, Exception) for reply in replies), replies
        rows.append((f"run_scripts, {size} per batch", time.perf_counter() - wall, time.process_time() - cpu))
    for start in range(0, len(keys), 100):
        await client.delete(*keys[start : start + 100])  # a cluster client splits it by slot
    return [(name, w / calls * 1e6, c / calls * 1e6) for name, w, c in rows]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=4096, help="script calls per case")
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--cluster-url", default="", help="a node of a running cluster (default: start one)")
    args = parser.parse_args()
    with cluster_url(args.cluster_url) as url:
        for name, client_url, cluster in (("redis", args.redis_url, False), ("cluster", url, True)):
            client = connect(client_url, cluster=cluster)
            try:
                for case, wall, cpu in await measure(client, args.calls):
                    print(f"{name:8} {case:32} {wall:8.1f} us/call wall {cpu:8.1f} us/call cpu")
            finally:
                await close(client)


if __name__ == "__main__":
    asyncio.run(main())
