"""What the benchmarks share: stores of their own on the machine's Postgres and Redis, server
processes, CPU and memory readings, percentiles, a description of the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psycopg
import redis
from psycopg import sql

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
POSTGRES_ADMIN_URL = os.environ.get("CREDITD_BENCH_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("CREDITD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_TOKEN = "cdk_bench_0123456789abcdef"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_url(database: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(POSTGRES_ADMIN_URL)
    user = info.get("user", "postgres")
    host = info.get("host", "127.0.0.1")
    port = info.get("port", 5432)
    return f"postgresql+psycopg://{user}@{host}:{port}/{database}"


@dataclass
class Stores:
    database: str
    database_url: str  # SQLAlchemy's form, as CREDITD_DATABASE_URL takes it
    redis_url: str
    prefix: str

    @property
    def conninfo(self) -> str:
        """The database's URL as libpq (psycopg) takes it."""
        return self.database_url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextlib.contextmanager
def bench_stores(database: Literal["creditd", "empty", "none"] = "creditd", redis_url: str = "") -> Iterator[Stores]:
    """A new Redis key prefix and a new Postgres database (with creditd's schema, empty, or
    none at all: then `database` is ""), both removed afterwards. `redis_url` names a Redis
    of the caller's own (a cluster it started and removes): its keys are left to it."""
    from creditd.db.migrate import upgrade

    name = f"creditd_bench_{uuid.uuid4().hex[:10]}" if database != "none" else ""
    if name:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    prefix = f"creditd-bench-{uuid.uuid4().hex[:10]}:"
    try:
        url = postgres_url(name) if name else ""
        if database == "creditd":
            upgrade(url)
        yield Stores(name, url, redis_url or REDIS_URL, prefix)
    finally:
        if name:
            with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if not redis_url:
            client = redis.Redis.from_url(REDIS_URL)
            try:
                keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
                for start in range(0, len(keys), 500):
                    client.delete(*keys[start : start + 500])
            finally:
                client.close()


def creditd_env(stores: Stores, listen: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITD_")}
    env.update(
        PYTHONUNBUFFERED="1",
        CREDITD_LISTEN=listen,
        CREDITD_DATABASE_URL=stores.database_url,
        CREDITD_REDIS_URL=stores.redis_url,
        CREDITD_REDIS_PREFIX=stores.prefix,
        CREDITD_ADMIN_TOKEN=ADMIN_TOKEN,
        CREDITD_DRAIN_SECONDS="0",
    )
    env.update(extra)
    return env


class Server:
    """A server process (bench/servers.py) whose output goes to a file; ready once it
    prints "listening on"."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 60) -> None:
        self.log = Path(tempfile.mkstemp(prefix="creditd-bench-", suffix=".log")[1])
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(HERE / "servers.py"), *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while "listening on" not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {args} did not start:\n{self.output()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text("utf-8", "replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        if os.environ.get("CREDITD_BENCH_KEEP_LOGS"):
            print(f"server log kept: {self.log}", file=sys.stderr)
        else:
            self.log.unlink(missing_ok=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = 0
    with contextlib.suppress(OSError, AttributeError):
        match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        memory = int(match.group(1)) // (1024 * 1024) if match else 0
    import grpc

    return (
        f"{os.cpu_count()} cores ({model}), {memory} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}, grpcio {grpc.__version__}"
    )


Sample = tuple[str, dict[str, str], float]


def scrape(address: str) -> list[Sample]:
    """Every sample on a Prometheus endpoint (host:port), as (name, labels, value)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def sample_sum(samples: Sequence[Sample], name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0 if none)."""
    return sum(value for n, have, value in samples if n == name and labels.items() <= have.items())


def pipelined(samples: Sequence[Sample]) -> tuple[float, float]:
    """(socket writes, commands) of creditd's hot-path Redis connection, from its metrics
    (creditd.redis.pipelined; absent on a cluster, whose pipelines are per node)."""
    ours = [
        (labels.get("count"), value) for name, labels, value in samples if name.startswith("creditd_redis_pipelined")
    ]
    return sum(v for c, v in ours if c == "writes"), sum(v for c, v in ours if c == "commands")


def commands_per_write(before: Sequence[Sample], after: Sequence[Sample]) -> float | None:
    """The batch size creditd's coalescing achieved between two scrapes."""
    (writes_before, commands_before), (writes_after, commands_after) = pipelined(before), pipelined(after)
    writes = writes_after - writes_before
    return round((commands_after - commands_before) / writes, 2) if writes else None
