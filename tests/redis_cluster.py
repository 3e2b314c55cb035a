"""A Redis Cluster of our own on loopback: 3 primaries and 3 replicas, real redis-server
processes (SPEC §9), without persistence, so that a node restarted is a node that lost
everything it held.

`LocalRedisCluster.start` creates it with `redis-cli --cluster create` and returns once
every node says cluster_state:ok and every replica is in sync with its primary.
`kill_primary` is a crash (SIGKILL) followed by the failover the cluster does by itself;
`restart` brings a killed node back, empty, under its old identity (nodes-<port>.conf).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import redis

from tests.crash.procs import RedisServer, wait_for

NODE_TIMEOUT_MS = 1500  # how long a primary may be silent before its replica takes over


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (each one held until all are chosen)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


class Node(RedisServer):
    """A redis-server that is a cluster node; its cluster identity survives a restart."""

    def __init__(self, port: int, bus_port: int) -> None:
        super().__init__(port)
        self.options = [
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            str(bus_port),
            "--cluster-config-file",
            str(self.dir / f"nodes-{port}.conf"),
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
        ]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_connect_timeout=0.5, socket_timeout=2)

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as client:
            return dict(client.info(section))

    def cluster_info(self) -> dict[str, Any]:
        with self.client() as client:
            return dict(client.execute_command("CLUSTER INFO"))

    def is_primary(self) -> bool:
        return self.info("replication").get("role") == "master"


class LocalRedisCluster:
    def __init__(self, primaries: int = 3, replicas_per_primary: int = 1) -> None:
        self.replicas_per_primary = replicas_per_primary
        ports = free_ports(2 * primaries * (1 + replicas_per_primary))
        self.nodes = [Node(port, bus_port) for port, bus_port in zip(ports[::2], ports[1::2], strict=True)]

    @property
    def url(self) -> str:
        """A URL naming one live node: a cluster client finds the others from it."""
        node = next(node for node in self.nodes if node.alive)
        return f"redis://{node.address}/0"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(node.address for node in self.nodes),
                "--cluster-replicas",
                str(self.replicas_per_primary),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_healthy()

    def live(self) -> list[Node]:
        return [node for node in self.nodes if node.alive]

    def primaries(self) -> list[Node]:
        return [node for node in self.live() if node.is_primary()]

    def replicas_of(self, primary: Node) -> list[Node]:
        replication = primary.info("replication")
        ports = {int(replica["port"]) for name, replica in replication.items() if name.startswith("slave")}
        return [node for node in self.live() if node.port in ports]

    def primary_for(self, key: str) -> Node:
        """The node serving `key`'s slot now."""
        with self.live()[0].client() as client:
            slot = int(client.execute_command("CLUSTER KEYSLOT", key))
            ranges = client.execute_command("CLUSTER SLOTS")
        for start, end, owner, *_ in ranges:
            if int(start) <= slot <= int(end):
                return next(node for node in self.nodes if node.port == int(owner[1]))
        raise AssertionError(f"slot {slot} of {key!r} is not served")

    def wait_healthy(self, timeout: float = 30) -> None:
        """Every live node sees the whole cluster ok, and every live replica is in sync."""

        def healthy() -> bool:
            for node in self.live():
                if node.cluster_info().get("cluster_state") != "ok":
                    return False
                replication = node.info("replication")
                if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                    return False
            return True

        wait_for(healthy, timeout, "the Redis Cluster to be ok with every replica in sync", interval=0.1)

    def kill_primary(self, primary: Node, timeout: float = 30) -> Node:
        """SIGKILL a primary; returns the replica promoted in its place, once the cluster is ok."""
        replicas = self.replicas_of(primary)
        assert replicas, f"{primary.address} has no replica to take over"
        primary.kill()
        return self.wait_promoted(replicas, timeout)

    def wait_promoted(self, replicas: list[Node], timeout: float = 30) -> Node:
        """Wait until one of `replicas` (of a primary that died) is primary and the cluster is ok."""
        wait_for(lambda: any(r.is_primary() for r in replicas), timeout, "a replica to take over")
        self.wait_healthy(timeout)
        return next(r for r in replicas if r.is_primary())

    def restart(self, node: Node, timeout: float = 30) -> None:
        """Start a killed node again with its cluster identity and none of its data."""
        node.kill()
        node.start()
        self.wait_healthy(timeout)

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@contextlib.contextmanager
def running_cluster() -> Iterator[LocalRedisCluster]:
    cluster = LocalRedisCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
