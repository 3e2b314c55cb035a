"""Processes that crash tests start, kill and restart, all on loopback (SPEC §9).

* `RedisServer`: a `redis-server` of our own on a free port, without persistence, so that
  killing it and starting it again is exactly "Redis lost everything it held".
* `PostgresCluster`: a private PostgreSQL 15 cluster (initdb/pg_ctl as the `postgres` user,
  which Postgres requires) on a free port, that a test may stop and start.
* `Serve`: a real `creditd serve` process; its output goes to a file (a pipe nobody drains
  would block it once full).
* `reconcile`: `creditd reconcile` as an operator runs it.
* `Ledger`: what Postgres holds, read with plain SQL.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql

PG_BIN = Path("/usr/lib/postgresql/15/bin")
ADMIN_TOKEN = "cdk_admin_crash_0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class RedisServer:
    """A redis-server on its own port; `kill` + `start` is a restart with its data gone."""

    def __init__(self, port: int | None = None, options: Sequence[str] = ()) -> None:
        self.port = port or free_port()
        self.options = list(options)  # more redis-server options
        self.dir = Path(tempfile.mkdtemp(prefix="creditd-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            wait_for(client.ping, 10, f"redis-server on port {self.port}")
        finally:
            client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresCluster:
    """A private PostgreSQL cluster in a temporary folder owned by `postgres`."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="creditd-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        account = _postgres_ids()
        os.chown(self.root, *account)

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True, timeout=timeout)

    def init(self) -> None:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        log = str(self.root / "log")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", log, "-w", "-o", options, "start")

    def stop(self, mode: str = "immediate") -> None:
        """`immediate` is a crash: no shutdown checkpoint, recovery at the next start."""
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    @property
    def admin_conninfo(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def close(self) -> None:
        if self.running():
            with contextlib.suppress(subprocess.SubprocessError):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def _postgres_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid


def creditd_env(database_url: str, redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    """The environment of a creditd process: ours, less any CREDITD_* of the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITD_")}
    env.update(
        PYTHONUNBUFFERED="1",
        CREDITD_DATABASE_URL=database_url,
        CREDITD_REDIS_URL=redis_url,
        CREDITD_REDIS_PREFIX=prefix,
        CREDITD_ADMIN_TOKEN=ADMIN_TOKEN,
    )
    env.update(extra)
    return env


class Serve:
    """A `creditd serve` process; returns once it says where it listens."""

    def __init__(self, env: dict[str, str], log: Path, timeout: float = 30) -> None:
        self.log = log
        self._offset = log.stat().st_size if log.exists() else 0
        self._file = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "creditd.cli", "serve"], env=env, stdout=self._file, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(r"listening on (\S+)", self.output())
            if match:
                self.address = match.group(1)
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._file.close()
                raise AssertionError("creditd serve did not start:\n" + self.output())
            time.sleep(0.05)

    def output(self) -> str:
        """What this process printed so far."""
        with self.log.open("rb") as f:
            f.seek(self._offset)
            return f.read().decode("utf-8", "replace")

    def kill(self) -> None:
        """SIGKILL: no drain, no last flush, nothing settled."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self._file.close()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._file.close()
        return self.process.returncode


def reconcile(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`creditd reconcile` against the stores named in `env`."""
    return subprocess.run(
        [sys.executable, "-m", "creditd.cli", "reconcile"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_reconciled(env: dict[str, str]) -> str:
    result = reconcile(env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"\b0 differences", result.stdout), output
    return result.stdout


def conninfo(database_url: str) -> str:
    """A libpq URL from the SQLAlchemy one."""
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


@dataclass
class Usage:
    session_id: str
    account_id: str
    usage_micros: int
    seconds: int


class Ledger:
    """Plain SQL reads of what the durable store holds."""

    def __init__(self, database_url: str) -> None:
        self.conninfo = conninfo(database_url)

    def _rows(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.conninfo, connect_timeout=5) as conn:
            return list(conn.execute(query, params).fetchall())

    def topup_keys(self) -> Counter[str]:
        """Idempotency key -> number of top-up entries carrying it."""
        return Counter(key for (key,) in self._rows("SELECT idempotency_key FROM ledger_entries WHERE kind = 1"))

    def voice_usage(self) -> list[Usage]:
        rows = self._rows(
            "SELECT session_id, account_id, usage_micros, seconds FROM ledger_entries WHERE kind = 2 ORDER BY seq"
        )
        return [Usage(*row) for row in rows]

    def sessions(self) -> dict[str, tuple[str, int, int, int]]:
        """session id -> (status, granted seconds, billed seconds, cutoff reason)."""
        rows = self._rows("SELECT session_id, status, granted_seconds, billed_seconds, cutoff_reason FROM sessions")
        return {row[0]: (row[1], row[2], row[3], row[4]) for row in rows}

    def balances(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(account, balance type) -> (free, purchased), summed over the ledger."""
        rows = self._rows(
            "SELECT account_id, balance_type, COALESCE(SUM(free_micros), 0), COALESCE(SUM(purchased_micros), 0)"
            " FROM ledger_entries GROUP BY account_id, balance_type"
        )
        return {(row[0], row[1]): (int(row[2]), int(row[3])) for row in rows}

    def max_seq(self) -> int:
        return int(self._rows("SELECT COALESCE(MAX(seq), 0) FROM ledger_entries")[0][0])

    def entries_after(self, seq: int) -> list[tuple[int, int, str, str, str]]:
        """(seq, kind, session id, idempotency key, account) of entries with a higher seq."""
        return [
            (int(r[0]), int(r[1]), r[2], r[3], r[4])
            for r in self._rows(
                "SELECT seq, kind, session_id, idempotency_key, account_id FROM ledger_entries"
                " WHERE seq > %s ORDER BY seq",
                seq,
            )
        ]


def open_channel(address: str) -> Any:
    """A channel of its own: grpc shares subchannels between channels by default, and one
    left in reconnect backoff by a killed server would fail the new channel's first calls."""
    import grpc

    return grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
