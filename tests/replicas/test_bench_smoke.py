"""The benchmarks work: short runs with tiny numbers (not benchmarks), and the peers that
bench/authorize.py compares creditd with debit what they should."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from creditd_client.v1 import common_pb2, metering_pb2

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import servers  # noqa: E402 - bench/servers.py
from common import Stores, bench_stores  # noqa: E402 - bench/common.py

TARGETS = ("bare", "naive-redis", "plain-postgres", "creditd")


def _run(script: str, *args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run a benchmark script; it must succeed. Returns it and all it printed."""
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=150)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return done, output


def test_the_authorize_benchmark_runs() -> None:
    done, output = _run(
        "authorize.py",
        *("--rounds", "1", "--duration", "0.5", "--warmup", "0.2", "--concurrency", "8", "--channels", "2"),
    )
    row = re.compile(r"^(\S+)\s+1\s+asyncio\s+1\s+8\s+2\s+(\d+)\s+(\d+)\s+.*\s(\d+)\s+(\d+)$", re.M)
    rows = {m.group(1): m.groups()[1:] for m in row.finditer(done.stdout)}
    assert set(rows) == set(TARGETS), output
    for target, (calls, _, errors, denied) in rows.items():
        # every call answered, and every one that debits was allowed
        assert int(calls) > 0, (target, output)
        assert (errors, denied) == ("0", "0"), (target, output)
    for target in ("bare", "naive Redis", "plain Postgres", "bare's p99"):
        assert re.search(rf"vs {target} [<>]= \d(\.\d)?x: +\d+\.\d\dx +(met|NOT MET)$", done.stdout, re.M), output


def test_the_sessions_benchmark_runs(tmp_path: Path) -> None:
    """The pool scenario on Redis + Postgres: a fifth of the sessions share an agency whose
    pool pays two slices each; they must all be cut together, for that reason, on time."""
    report = tmp_path / "sessions.json"
    done, output = _run(
        "sessions.py",
        *("--scenario", "pool", "--sessions", "100", "--clients", "10", "--loadgen-procs", "1"),
        *("--hold", "8", "--slice-seconds", "2", "--renewal-lead", "1", "--report-every", "1"),
        *("--new-calls", "10", "--json", str(report)),
    )
    result = json.loads(report.read_text())
    assert (result["started"], result["errors"], result["denied"], result["unfinished"]) == (100, 0, 0, 0), output
    assert result["pool"]["dry_sessions"] == result["dry_cutoffs"] == result["cutoffs"] == 20, output
    assert result["cutoffs_in_hold"] == 20, output  # the pool runs dry in the hold, not in the ramp
    assert result["cutoff_reasons"] == [common_pb2.DENY_REASON_AGENCY_CREDITS_EXHAUSTED], output
    assert result["pool"]["grant_ends_spread_seconds"] < 2  # answered together, so cut together
    assert result["cutoff_lateness_ms"]["max"] is not None
    assert result["overspent_seconds"] == 0
    assert result["reconcile"].endswith(" 0 differences"), result["reconcile"]
    assert result["new_calls"]["calls"] > 0 and not result["new_calls"]["errors"], result["new_calls"]
    assert result["stalls"]["heartbeats"] > 0, result["stalls"]  # read from the server's metrics
    verdicts = re.findall(r"^  (.+?) {2,}(met|NOT MET) ", done.stdout, re.M)
    assert len(verdicts) == 8, output  # every target of SPEC §8 this run measures


def test_the_sessions_benchmark_runs_on_the_bare_servicer(tmp_path: Path) -> None:
    """The same load on a servicer that does no work: every session answered and hung up,
    the new calls allowed, nothing that only creditd measures claimed."""
    report = tmp_path / "bare.json"
    done, output = _run(
        "sessions.py",
        *("--server", "bare", "--sessions", "50", "--clients", "10", "--poor-clients", "2", "--loadgen-procs", "1"),
        *("--hold", "3", "--report-every", "1", "--new-calls", "10", "--ramp-seconds", "0", "--json", str(report)),
    )
    result = json.loads(report.read_text())
    assert (result["started"], result["errors"], result["denied"], result["summaries"]) == (50, 0, 0, 50), output
    assert result["reports"] > 0 and result["cutoffs"] == 0, output
    assert result["new_calls"]["calls"] > 0 and result["new_calls"]["denied"] == 0, result["new_calls"]
    assert not result["new_calls"]["errors"], result["new_calls"]
    assert result["server_cores"] > 0 and result["stalls"] is None, output
    assert result["reconcile"] == "not applicable (bare)", output
    assert "bare gRPC servicer" in done.stdout, output


def test_the_grpc_streams_benchmark_runs() -> None:
    done, output = _run("grpc_streams.py", "--streams", "300")
    assert re.search(r"^300 streams open in [\d.]+ s \(\d+ refused, opened again\)$", done.stdout, re.M), output
    per_stream = re.search(r"^per stream: (\d+\.\d) KB of RSS, (\d+\.\d) tracked objects$", done.stdout, re.M)
    assert per_stream is not None, output
    # each open call keeps gRPC's objects for its pending read: far more than one a stream
    assert float(per_stream.group(2)) > 10, output


# -- the peers ---------------------------------------------------------------------------


@pytest.fixture
def stores() -> Iterator[Stores]:
    with bench_stores("empty") as made:
        yield made


def _naive_redis(stores: Stores) -> tuple[Any, Callable[[str, int, int], None], Callable[[str], tuple[int, int]]]:
    servers.prepare_naive_redis(stores.redis_url, stores.prefix, "agency", ["client"], 0)
    client = redis.Redis.from_url(stores.redis_url)

    def set_wallet(account: str, free: int, purchased: int) -> None:
        client.hset(f"{stores.prefix}wallet:{account}", mapping={"free": free, "purchased": purchased})

    def wallet(account: str) -> tuple[int, int]:
        free, purchased = client.hmget(f"{stores.prefix}wallet:{account}", "free", "purchased")
        return int(free), int(purchased)

    args = argparse.Namespace(redis_url=stores.redis_url, prefix=stores.prefix, agency="agency")
    return servers._NaiveRedis(args), set_wallet, wallet


def _plain_postgres(stores: Stores) -> tuple[Any, Callable[[str, int, int], None], Callable[[str], tuple[int, int]]]:
    servers.prepare_plain_postgres(stores.conninfo, "agency", ["client"], 0)

    def set_wallet(account: str, free: int, purchased: int) -> None:
        with psycopg.connect(stores.conninfo, autocommit=True) as conn:
            conn.execute(
                "UPDATE wallets SET free_micros = %s, purchased_micros = %s WHERE account_id = %s",
                (free, purchased, account),
            )

    def wallet(account: str) -> tuple[int, int]:
        with psycopg.connect(stores.conninfo) as conn:
            row = conn.execute(
                "SELECT free_micros, purchased_micros FROM wallets WHERE account_id = %s", (account,)
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    args = argparse.Namespace(database=stores.conninfo, pool=1, agency="agency")
    return servers._PlainPostgres(args), set_wallet, wallet


@pytest.mark.parametrize("peer", [_naive_redis, _plain_postgres], ids=["naive-redis", "plain-postgres"])
async def test_a_peer_debits_both_wallets_free_first_or_nothing(stores: Stores, peer: Any) -> None:
    servicer, set_wallet, wallet = peer(stores)
    if hasattr(servicer, "open"):
        await servicer.open()
    try:
        slice_micros = servers.SLICE_MICROS
        set_wallet("client", 400_000, 1_000_000)
        set_wallet("agency", 0, slice_micros - 1)
        request = metering_pb2.AuthorizeRequest(session_id="s1", client_id="client")

        denied = await servicer.Authorize(request, None)
        assert not denied.allowed
        assert denied.deny_reason == common_pb2.DENY_REASON_AGENCY_CREDITS_EXHAUSTED
        assert wallet("client") == (400_000, 1_000_000)  # all or nothing: the client paid nothing either

        set_wallet("agency", 300_000, slice_micros)
        allowed = await servicer.Authorize(request, None)
        assert allowed.allowed and allowed.granted_seconds == servers.SLICE_SECONDS
        assert wallet("client") == (0, 1_000_000 - (slice_micros - 400_000))  # free first, then purchased
        assert wallet("agency") == (0, slice_micros - (slice_micros - 300_000))
        if isinstance(servicer, servers._PlainPostgres):  # and a ledger row per wallet, with the split
            with psycopg.connect(stores.conninfo) as conn:
                rows = conn.execute(
                    "SELECT account_id, amount_micros, free_micros, purchased_micros FROM ledger ORDER BY seq"
                ).fetchall()
            assert rows == [
                ("client", -slice_micros, -400_000, -(slice_micros - 400_000)),
                ("agency", -slice_micros, -300_000, -(slice_micros - 300_000)),
            ]

        set_wallet("client", 0, slice_micros - 1)
        assert (await servicer.Authorize(request, None)).deny_reason == common_pb2.DENY_REASON_CLIENT_CREDITS_EXHAUSTED
    finally:
        await servicer.close()
