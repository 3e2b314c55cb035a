"""Authorize end to end on creditd (Redis + Postgres) against the designs a user would build
instead (SPEC §8), each a grpc.aio servicer of the same creditd.v1 MeteringService.Authorize:

  bare            answers at once, no work: the cost of gRPC and the event loop alone
  naive-redis     one two-wallet Lua debit through redis-py per call
  plain-postgres  one row-locking two-wallet transaction through psycopg per call
  creditd         `creditd serve` on Redis + Postgres

One run alternates the four over --rounds rounds (bare, naive-redis, plain-postgres,
creditd, then again), so that a machine getting busier or quieter weighs on all of them
alike. Each is driven by the same load generator: a separate process running
--concurrency asyncio clients (64) over --channels channels (each its own HTTP/2
connection), each calling Authorize back to back for --duration seconds after a --warmup.
Reported per measurement: calls per second, p50 and p99 latency, the server process's CPU
(cores) during the measurement (the servers only: not Redis, Postgres or the load
generator); then, per server, the median over the rounds, and creditd's ratios to each
peer against SPEC §8's targets, each said met or not met.

Every Authorize uses a fresh session_id and debits one 60 s slice at 1 credit a minute from
the client's wallet and the agency's. On creditd each is a real new session: catalog and
authorization checks, one Lua reservation of the first slice on both wallets (plus its
session record written behind to Postgres). The wallets are funded up front (10^13 micros
each) instead of releasing each session: a release would be a second RPC (a StreamUsage
stream with SessionEnd) that the peers do not make. creditd's reservations are left to
expire after CREDITD_AUTHORIZE_TTL_SECONDS (60 s, after the measurement). Every server
that keeps state gets a new Postgres database and Redis key prefix, dropped afterwards.

    python bench/authorize.py                     # 3 rounds of the four, asyncio, one process each
    python bench/authorize.py --loop uvloop       # servers on uvloop
    python bench/authorize.py --procs 2           # two processes per server on one port (SO_REUSEPORT)
    python bench/authorize.py --matrix            # the three above, in one run
    python bench/authorize.py --profile out.txt   # py-spy the creditd server while it is measured
    python bench/authorize.py --redis-cluster 3   # bare and creditd, creditd on a 3-primary Redis Cluster

Needs the machine's Postgres (CREDITD_BENCH_POSTGRES_ADMIN_URL) and Redis (CREDITD_BENCH_REDIS_URL).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))

import servers as servers_module
from common import (
    ADMIN_TOKEN,
    Sample,
    Server,
    Stores,
    bench_stores,
    commands_per_write,
    cpu_seconds,
    creditd_env,
    free_port,
    machine,
    percentile,
    scrape,
)

CREDIT = 1_000_000
FUNDS = 10**13  # micros on every wallet: 10 million one-credit slices


TARGETS = ("bare", "naive-redis", "plain-postgres", "creditd")
AGENCY = "bench"


@dataclass
class Result:
    target: str
    round: int
    loop: str
    procs: int
    concurrency: int
    channels: int
    calls: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    denied: int
    server_cores: float
    loadgen_cores: float
    cores_per_process: list[float]
    redis_batch: float | None = None  # creditd on one Redis: commands per socket write


# -- the load generator (its own process) ---------------------------------------------------


async def _load(args: argparse.Namespace) -> dict[str, Any]:
    import grpc
    from creditd_client.v1 import common_pb2, metering_pb2, metering_pb2_grpc

    channels = [
        grpc.aio.insecure_channel(args.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(args.channels)
    ]
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), 10)
    stubs = [metering_pb2_grpc.MeteringServiceStub(channel) for channel in channels]
    metadata = (("authorization", f"Bearer {args.token}"),)
    clients = [f"{args.client_prefix}{i}" for i in range(args.clients)]
    run = uuid.uuid4().hex[:8]
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    denied = 0
    loop = asyncio.get_running_loop()
    begin = loop.time()
    measure_from = begin + args.warmup
    end = measure_from + args.duration

    async def worker(number: int) -> None:
        nonlocal denied
        stub = stubs[number % len(stubs)]
        client_id = clients[number % len(clients)]
        i = 0
        while True:
            started = loop.time()
            if started >= end:
                return
            request = metering_pb2.AuthorizeRequest(
                session_id=f"{run}-{number}-{i}",
                client_id=client_id,
                channel=common_pb2.CHANNEL_VOICE,
                direction=common_pb2.DIRECTION_INBOUND,
            )
            i += 1
            try:
                response = await stub.Authorize(request, metadata=metadata, timeout=10)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                continue
            if started >= measure_from:
                latencies.append(loop.time() - started)
                denied += not response.allowed

    async def marks() -> None:
        await asyncio.sleep(max(0.0, measure_from - loop.time()))
        print("measuring", flush=True)
        await asyncio.sleep(max(0.0, end - loop.time()))
        print("measured", flush=True)

    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime
    await asyncio.gather(marks(), *(worker(n) for n in range(args.concurrency)))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    for channel in channels:
        await channel.close()
    latencies.sort()
    return {
        "calls": len(latencies),
        "seconds": args.duration,
        "rps": len(latencies) / args.duration,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "errors": dict(errors),
        "denied": denied if args.count_denied else 0,
        "loadgen_cores": (usage.ru_utime + usage.ru_stime - cpu_before) / (args.warmup + args.duration),
    }


def load_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="authorize.py load")
    parser.add_argument("--target", required=True)
    parser.add_argument("--token", default=ADMIN_TOKEN)
    parser.add_argument("--client-prefix", default="bench-c")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--count-denied", action="store_true")
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    print(json.dumps(asyncio.run(_load(args))), flush=True)


# -- one measured run ---------------------------------------------------------------------


async def _setup_creditd(address: str, clients: int) -> None:
    """An agency and its clients, funded for millions of slices."""
    import grpc
    from creditd_client.v1 import account_pb2, account_pb2_grpc, common_pb2, ledger_pb2, ledger_pb2_grpc

    metadata = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        await accounts.CreateAgency(
            account_pb2.CreateAgencyRequest(agency_id="bench", free_voice_micros=FUNDS), metadata=metadata
        )
        await accounts.CreatePlan(
            account_pb2.CreatePlanRequest(
                agency_id="bench",
                plan_id="p",
                default_voice_micros_per_minute=CREDIT,
                default_sms_micros_per_segment=166_000,
            ),
            metadata=metadata,
        )
        for i in range(clients):
            client_id = f"bench-c{i}"
            await accounts.CreateClient(
                account_pb2.CreateClientRequest(
                    client_id=client_id,
                    agency_id="bench",
                    plan_id="p",
                    billing_mode=common_pb2.BILLING_MODE_REBILLING,
                ),
                metadata=metadata,
            )
            await ledger.Topup(
                ledger_pb2.TopupRequest(
                    account_id=client_id,
                    balance_type=common_pb2.BALANCE_TYPE_VOICE,
                    amount_micros=FUNDS,
                    kind=ledger_pb2.TOPUP_KIND_PURCHASE,
                    idempotency_key=f"bench-fund-{client_id}",
                ),
                metadata=metadata,
            )


def _py_spy(pid: int, seconds: float, out: str) -> subprocess.Popen[bytes] | None:
    binary = shutil.which("py-spy")
    if binary is None:
        print("py-spy is not installed (pip install py-spy): no profile", file=sys.stderr)
        return None
    command = [binary, "record", "--pid", str(pid), "--rate", "250", "--duration", str(int(seconds))]
    return subprocess.Popen(
        [*command, "--format", "raw", "--output", out],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _start_servers(
    target: str, stores: Stores | None, args: argparse.Namespace, listen: str, flags: list[str], procs: int
) -> list[Server]:
    """The server processes of one measurement, their wallets funded."""
    clients = [f"bench-c{i}" for i in range(args.clients)]
    if target == "creditd":
        assert stores is not None
        env = creditd_env(stores, listen)
        if procs == 1:
            env["CREDITD_METRICS_LISTEN"] = args.metrics_listen
        servers: list[Server] = []
        try:
            for _ in range(procs):
                servers.append(Server(["creditd", *flags], env))
            asyncio.run(_setup_creditd(listen, args.clients))
        except BaseException:
            for server in servers:  # the caller has no list to stop yet
                server.kill()
            raise
        return servers
    peer = [target, "--listen", listen, "--agency", AGENCY, *flags]
    if target == "naive-redis":
        assert stores is not None
        servers_module.prepare_naive_redis(stores.redis_url, stores.prefix, AGENCY, clients, FUNDS)
        peer += ["--redis-url", stores.redis_url, "--prefix", stores.prefix]
    elif target == "plain-postgres":
        assert stores is not None
        servers_module.prepare_plain_postgres(stores.conninfo, AGENCY, clients, FUNDS)
        peer += ["--database", stores.conninfo, "--pool", str(args.pg_pool)]
    return [Server(peer) for _ in range(procs)]


def measure(target: str, args: argparse.Namespace, loop: str, procs: int, round_number: int) -> Result:
    port = free_port()
    listen = f"127.0.0.1:{port}"
    flags = ["--uvloop"] if loop == "uvloop" else []
    if procs > 1:
        flags.append("--reuseport")
    servers: list[Server] = []
    databases: dict[str, Literal["creditd", "empty", "none"]] = {
        "naive-redis": "none",
        "plain-postgres": "empty",
        "creditd": "creditd",
    }
    keeps_state = target in databases
    stores_cm = bench_stores(databases[target], args.cluster_url) if keeps_state else contextlib.nullcontext()
    with stores_cm as stores:
        try:
            servers = _start_servers(target, stores, args, listen, flags, procs)
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "load",
                "--target",
                listen,
                "--clients",
                str(args.clients),
                "--concurrency",
                str(args.concurrency),
                "--channels",
                str(args.channels),
                "--duration",
                str(args.duration),
                "--warmup",
                str(args.warmup),
            ]
            if target != "bare":
                command.append("--count-denied")
            if args.loadgen_uvloop:
                command.append("--uvloop")
            generator = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            assert generator.stdout is not None
            cpu: dict[str, float] = {}
            metrics: dict[str, list[Sample]] = {}
            spy = None
            report: dict[str, Any] = {}
            for line in generator.stdout:
                line = line.strip()
                if line in ("measuring", "measured"):
                    for i, server in enumerate(servers):
                        cpu[f"{line}{i}"] = cpu_seconds(server.pid)
                    cpu[line] = sum(cpu_seconds(s.pid) for s in servers)
                    cpu[line + "_at"] = time.monotonic()
                    if target == "creditd" and procs == 1:
                        metrics[line] = scrape(args.metrics_listen)
                    if line == "measuring" and args.profile and target == "creditd":
                        spy = _py_spy(servers[0].pid, args.duration, args.profile)
                elif line.startswith("{"):
                    report = json.loads(line)
            if generator.wait() != 0 or not report:
                raise RuntimeError("the load generator failed")
            if spy is not None:
                spy.wait(60)
            elapsed = cpu["measured_at"] - cpu["measuring_at"]
            return Result(
                target=target,
                round=round_number,
                loop=loop,
                procs=procs,
                concurrency=args.concurrency,
                channels=args.channels,
                calls=report["calls"],
                seconds=report["seconds"],
                rps=report["rps"],
                p50_ms=report["p50_ms"],
                p99_ms=report["p99_ms"],
                errors=report["errors"],
                denied=report["denied"],
                server_cores=(cpu["measured"] - cpu["measuring"]) / elapsed,
                loadgen_cores=report["loadgen_cores"],
                cores_per_process=[
                    round((cpu[f"measured{i}"] - cpu[f"measuring{i}"]) / elapsed, 2) for i in range(len(servers))
                ],
                redis_batch=commands_per_write(metrics["measuring"], metrics["measured"]) if metrics else None,
            )
        finally:
            for server in servers:
                server.kill()


HEADER = (
    f"{'server':<14} {'round':>5} {'loop':<8} {'procs':>5} {'conc':>5} {'chan':>4} {'calls':>8} {'calls/s':>9}"
    f" {'p50 ms':>8} {'p99 ms':>8} {'srv cpu':>7} {'load cpu':>8} {'errors':>6} {'denied':>6}"
)


def _line(result: Result) -> str:
    errors = sum(result.errors.values())
    return (
        f"{result.target:<14} {result.round:>5} {result.loop:<8} {result.procs:>5} {result.concurrency:>5}"
        f" {result.channels:>4} {result.calls:>8} {result.rps:>9.0f} {result.p50_ms:>8.2f} {result.p99_ms:>8.2f}"
        f" {result.server_cores:>7.2f} {result.loadgen_cores:>8.2f} {errors:>6} {result.denied:>6}"
        + (f"  per process {result.cores_per_process}" if result.procs > 1 else "")
    )


def _spread(values: list[float], digits: int = 0, unit: str = "") -> str:
    """The median of the rounds, with their range when there are several."""
    text = f"{statistics.median(values):,.{digits}f}{unit}"
    if len(values) > 1:
        text += f" ({min(values):,.{digits}f}-{max(values):,.{digits}f})"
    return text


# creditd against its peers (SPEC §8): (what, peer, compared figure, at least / at most, target)
TARGET_CHECKS = (
    ("throughput vs bare", "bare", "rps", ">=", 0.8),
    ("throughput vs naive Redis", "naive-redis", "rps", ">=", 1.2),
    ("throughput vs plain Postgres", "plain-postgres", "rps", ">=", 2.0),
    ("p99 latency vs bare's p99", "bare", "p99_ms", "<=", 2.0),
)


def summarize(results: list[Result], loop: str, procs: int) -> list[str]:
    """Per server, the median over the rounds; then creditd's ratios to each peer (the
    median of the rounds' ratios, each round's servers having run back to back)."""
    lines = [f"summary ({loop} x{procs}, median of {max(r.round for r in results)} rounds, range in brackets):"]
    lines.append(f"  {'server':<14} {'calls/s':>22} {'p50 ms':>20} {'p99 ms':>20} {'srv cpu':>16}")
    by_target = {t: [r for r in results if r.target == t] for t in TARGETS}
    for target, rows in by_target.items():
        if rows:
            lines.append(
                f"  {target:<14} {_spread([r.rps for r in rows]):>22} {_spread([r.p50_ms for r in rows], 1):>20}"
                f" {_spread([r.p99_ms for r in rows], 1):>20} {_spread([r.server_cores for r in rows], 2):>16}"
            )
    batches = [r.redis_batch for r in by_target["creditd"] if r.redis_batch is not None]
    if batches:
        lines.append(f"  creditd's Redis commands per socket write (the coalescing): {_spread(batches, 1)}")
    lines.append("creditd against SPEC §8's targets:")
    creditd = {r.round: r for r in by_target["creditd"]}
    for what, peer, figure, sense, goal in TARGET_CHECKS:
        ratios = [
            getattr(creditd[r.round], figure) / getattr(r, figure)
            for r in by_target[peer]
            if r.round in creditd and getattr(r, figure) > 0
        ]
        label = f"{what} {sense} {goal:g}x:"
        if not ratios:
            lines.append(f"  {label:<38} not measured")
            continue
        ratio = statistics.median(ratios)
        met = ratio >= goal if sense == ">=" else ratio <= goal
        lines.append(f"  {label:<38} {_spread(ratios, 2, 'x')}  {'met' if met else 'NOT MET'}")
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        load_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per server and round")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3, help="times the four servers are measured, alternated")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight (asyncio clients)")
    parser.add_argument("--channels", type=int, default=4, help="channels (HTTP/2 connections) they share")
    parser.add_argument("--clients", type=int, default=8, help="client accounts the calls spread over")
    parser.add_argument("--pg-pool", type=int, default=16, help="plain-postgres: its connections")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the servers' event loop")
    parser.add_argument("--procs", type=int, default=1, help="server processes on one port (SO_REUSEPORT)")
    parser.add_argument("--matrix", action="store_true", help="asyncio x1, uvloop x1 and uvloop x2 in one run")
    parser.add_argument("--loadgen-uvloop", action="store_true", help="run the load generator on uvloop")
    parser.add_argument("--profile", help="py-spy raw profile of the creditd server written here")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--redis-cluster",
        type=int,
        metavar="PRIMARIES",
        help="start a Redis Cluster of this many primaries on free loopback ports and measure bare and"
        " creditd on it (the peers are single-node designs)",
    )
    args = parser.parse_args()
    args.cluster_url = ""
    args.metrics_listen = f"127.0.0.1:{free_port()}"
    if args.redis_cluster:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the test suite's cluster harness
        from tests.redis_cluster import LocalRedisCluster

        cluster = LocalRedisCluster(primaries=args.redis_cluster, replicas_per_primary=0)
        cluster.start()
        args.cluster_url = cluster.url
        try:
            _run(args, ("bare", "creditd"))
        finally:
            cluster.close()
        return
    _run(args, TARGETS)


def _run(args: argparse.Namespace, targets: tuple[str, ...]) -> None:

    configs = [("asyncio", 1), ("uvloop", 1), ("uvloop", 2)] if args.matrix else [(args.loop, args.procs)]
    print(f"machine: {machine()}")
    if args.cluster_url:
        print(f"creditd's Redis: a cluster of {args.redis_cluster} primaries, no replicas ({args.cluster_url})")
    print(
        f"load: {args.concurrency} calls in flight over {args.channels} channels, {args.warmup:g}s warm-up,"
        f" {args.duration:g}s measured per server, {args.rounds} rounds alternated, fresh session_id per call"
    )
    results: list[Result] = []
    summaries: list[str] = []
    for loop, procs in configs:
        print(HEADER)
        measured: list[Result] = []
        for round_number in range(1, args.rounds + 1):
            for target in targets:
                result = measure(target, args, loop, procs, round_number)
                print(_line(result), flush=True)
                measured.append(result)
        summary = summarize(measured, loop, procs)
        print("\n".join(summary), flush=True)
        summaries += summary
        results += measured
    if len(configs) > 1:  # all summaries again, together
        print("\n".join(summaries))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
