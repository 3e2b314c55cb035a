"""Many concurrent voice sessions against one creditd process (SPEC §8).

N sessions (default 10,000) are authorized and answered, then each reports its cumulative
seconds every --report-every seconds (5) for --hold seconds. A share of the client accounts
(--poor-clients) can pay for only about 1.5 slices per session, so their sessions run dry
during the hold: the server must cut each one with a Cutoff at the end of its last grant,
driven by its own timer. Measured:

  * the server process's CPU (cores) and RSS while all sessions are live (SPEC: under one
    core and under 500 MB on a 2-core machine);
  * cutoff latency: when each Cutoff arrived after the end of the session's last grant
    (Grant.expires_at), p50/p99/max (SPEC: p99 within 50 ms), and overspent seconds: billed
    beyond what was granted (SPEC: zero), plus a reconcile and no wallet below zero;
  * Postgres writes against slice renewals and usage reports during the hold (SPEC: at most
    one batched durable write per renewal; none per report), from pg_stat_user_tables and
    pg_stat_database.

The load generator runs in --loadgen-procs separate processes (default 2), each with its
share of the sessions over its own channels (at most 200 streams per HTTP/2 connection).

    python bench/sessions.py                       # 10,000 sessions, Redis + Postgres
    python bench/sessions.py --sessions 2000 --hold 90
    python bench/sessions.py --store embedded      # in-process hot state, SQLite

Needs the machine's Postgres (CREDITD_BENCH_POSTGRES_ADMIN_URL) and Redis (CREDITD_BENCH_REDIS_URL).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    ADMIN_TOKEN,
    Server,
    bench_stores,
    cpu_seconds,
    creditd_env,
    free_port,
    machine,
    percentile,
    rss_bytes,
)

CREDIT = 1_000_000
STREAMS_PER_CHANNEL = 200


# -- the load generator (its own process) ---------------------------------------------------


class Session:
    def __init__(self, session_id: str, client_id: str) -> None:
        self.session_id = session_id
        self.client_id = client_id
        self.granted = 0
        self.grant_end = 0.0  # wall clock end of the last grant (Grant.expires_at)
        self.grants = 0
        self.reports = 0
        self.started = 0.0
        self.final: Any = None
        self.final_kind = ""
        self.final_at = 0.0
        self.error = ""


async def _load(args: argparse.Namespace) -> dict[str, Any]:
    import grpc
    from creditd_client.v1 import common_pb2, metering_pb2, metering_pb2_grpc

    count = args.count
    channels = [
        grpc.aio.insecure_channel(args.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, -(-count // STREAMS_PER_CHANNEL)))
    ]
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), 30)
    stubs = [metering_pb2_grpc.MeteringServiceStub(channel) for channel in channels]
    metadata = (("authorization", f"Bearer {args.token}"),)
    sessions = [Session(f"{args.name}-{i}", f"c{(args.first + i) % args.clients}") for i in range(count)]
    stop = asyncio.Event()
    gate = asyncio.Semaphore(args.ramp_concurrency)
    renewals_by_second: dict[int, int] = {}
    details: dict[str, float] = {}  # error text -> when it last happened
    reports_by_second: dict[int, int] = {}
    denied = 0

    def take(session: Session, message: Any) -> None:
        kind = message.WhichOneof("msg")
        if kind == "grant":
            if session.grants:
                second = int(time.time())
                renewals_by_second[second] = renewals_by_second.get(second, 0) + 1
            session.granted = message.grant.granted_seconds
            session.grant_end = message.grant.expires_at.seconds + message.grant.expires_at.nanos / 1e9
            session.grants += 1
        elif kind in ("cutoff", "summary"):
            session.final = message
            session.final_kind = kind
            session.final_at = time.time()

    async def run(number: int, session: Session) -> None:
        nonlocal denied
        stub = stubs[number % len(stubs)]
        async with gate:
            try:
                answer = await stub.Authorize(
                    metering_pb2.AuthorizeRequest(
                        session_id=session.session_id,
                        client_id=session.client_id,
                        channel=common_pb2.CHANNEL_VOICE,
                        direction=common_pb2.DIRECTION_INBOUND,
                    ),
                    metadata=metadata,
                    timeout=60,
                )
            except grpc.aio.AioRpcError as exc:
                session.error = exc.code().name
                return
            if not answer.allowed:
                denied += 1
                return
            call = stub.StreamUsage(metadata=metadata)
            await call.write(
                metering_pb2.StreamUsageRequest(
                    start=metering_pb2.SessionStart(
                        session_id=session.session_id,
                        client_id=session.client_id,
                        channel=common_pb2.CHANNEL_VOICE,
                    )
                )
            )
            session.started = time.monotonic()

        async def report() -> None:
            await asyncio.sleep(random.uniform(0, args.report_every))
            while session.final is None and not stop.is_set():
                used = min(session.granted, int(time.monotonic() - session.started))
                await call.write(metering_pb2.StreamUsageRequest(usage=metering_pb2.UsageReport(seconds_used=used)))
                session.reports += 1
                second = int(time.time())
                reports_by_second[second] = reports_by_second.get(second, 0) + 1
                await asyncio.sleep(args.report_every)

        reporter = asyncio.create_task(report())
        try:
            while session.final is None:
                reading = asyncio.ensure_future(call.read())
                stopping = asyncio.ensure_future(stop.wait())
                done, _ = await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if reading in done:
                    stopping.cancel()
                    message = reading.result()
                    if message is grpc.aio.EOF:
                        break
                    take(session, message)
                    continue
                # the hold is over: hang up properly
                reporter.cancel()
                used = min(session.granted, int(time.monotonic() - session.started))
                await call.write(metering_pb2.StreamUsageRequest(end=metering_pb2.SessionEnd(seconds_used=used)))
                message = await reading
                while message is not grpc.aio.EOF:
                    take(session, message)
                    if session.final is not None:
                        break
                    message = await call.read()
                break
        except grpc.aio.AioRpcError as exc:
            session.error = exc.code().name
            details[f"{exc.code().name}: {exc.details()}"[:200]] = time.time()
        finally:
            reporter.cancel()

    tasks = [asyncio.create_task(run(i, s)) for i, s in enumerate(sessions)]

    async def ready() -> None:
        while sum(1 for s in sessions if s.started or s.error) + denied < count:  # noqa: ASYNC110
            await asyncio.sleep(0.25)
        print(json.dumps({"ready": sum(1 for s in sessions if s.started)}), flush=True)

    await ready()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the orchestrator says when
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    cutoffs = [s for s in sessions if s.final_kind == "cutoff"]
    return {
        "sessions": count,
        "started": sum(1 for s in sessions if s.started),
        "denied": denied,
        "errors": sum(1 for s in sessions if s.error),
        "error_kinds": sorted({s.error for s in sessions if s.error}),
        "renewals": sum(max(0, s.grants - 1) for s in sessions),
        "reports": sum(s.reports for s in sessions),
        "summaries": sum(1 for s in sessions if s.final_kind == "summary"),
        "cutoffs": len(cutoffs),
        "cutoff_reasons": sorted({int(s.final.cutoff.reason) for s in cutoffs}),
        "cutoff_lateness_ms": [(s.final_at - s.grant_end) * 1000 for s in cutoffs],
        "overspent_seconds": sum(max(0, s.final.cutoff.billed_seconds - s.granted) for s in cutoffs)
        + sum(max(0, s.final.summary.billed_seconds - s.granted) for s in sessions if s.final_kind == "summary"),
        "unfinished": sum(1 for s in sessions if s.started and s.final is None),
        "error_details": details,
        "renewals_by_second": renewals_by_second,
        "reports_by_second": reports_by_second,
    }


def load_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="sessions.py load")
    parser.add_argument("--target", required=True)
    parser.add_argument("--token", default=ADMIN_TOKEN)
    parser.add_argument("--name", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--report-every", type=float, default=5.0)
    parser.add_argument("--ramp-concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_load(args))), flush=True)


# -- the orchestrator ---------------------------------------------------------------------


async def _setup(address: str, clients: int, poor: int, sessions_per_client: int) -> None:
    import grpc
    from creditd_client.v1 import account_pb2, account_pb2_grpc, common_pb2, ledger_pb2, ledger_pb2_grpc

    metadata = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        await accounts.CreateAgency(
            account_pb2.CreateAgencyRequest(agency_id="a", free_voice_micros=10**13), metadata=metadata
        )
        await accounts.CreatePlan(
            account_pb2.CreatePlanRequest(
                agency_id="a", plan_id="p", default_voice_micros_per_minute=CREDIT, default_sms_micros_per_segment=1
            ),
            metadata=metadata,
        )
        for i in range(clients):
            await accounts.CreateClient(
                account_pb2.CreateClientRequest(
                    client_id=f"c{i}", agency_id="a", plan_id="p", billing_mode=common_pb2.BILLING_MODE_REBILLING
                ),
                metadata=metadata,
            )
            # poor clients pay for about 1.5 slices of 60 s per session: they run dry mid-run
            amount = sessions_per_client * 3 * CREDIT // 2 if i < poor else 10**12
            await ledger.Topup(
                ledger_pb2.TopupRequest(
                    account_id=f"c{i}",
                    balance_type=common_pb2.BALANCE_TYPE_VOICE,
                    amount_micros=amount,
                    kind=ledger_pb2.TOPUP_KIND_PURCHASE,
                    idempotency_key=f"fund-c{i}",
                ),
                metadata=metadata,
            )


def _pg_counters(database_url: str) -> dict[str, int]:
    import psycopg

    conninfo = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        rows = conn.execute(
            "SELECT relname, n_tup_ins, n_tup_upd FROM pg_stat_user_tables"
            " WHERE relname IN ('sessions', 'ledger_entries', 'events')"
        ).fetchall()
        commits = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()").fetchone()
    counters = {f"{name}_rows": int(ins) + int(upd) for name, ins, upd in rows}
    counters["commits"] = int(commits[0]) if commits else 0
    return counters


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        load_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--poor-clients", type=int, default=40, help="clients whose sessions run dry mid-run")
    parser.add_argument("--report-every", type=float, default=5.0)
    parser.add_argument("--hold", type=float, default=150.0, help="seconds all sessions stay up after the ramp")
    parser.add_argument("--slice", type=int, default=60, help="CREDITD_SLICE_SECONDS")
    parser.add_argument("--store", choices=("redis", "embedded"), default="redis")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the server's event loop")
    parser.add_argument("--loadgen-procs", type=int, default=2)
    parser.add_argument("--ramp-concurrency", type=int, default=32, help="Authorize calls in flight per load process")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--profile", help="py-spy raw profile of the server (30 s of the hold) written here")
    parser.add_argument("--gc-log", action="store_true", help="count the server's garbage-collection pauses")
    parser.add_argument("--gc-freeze", action="store_true", help="server: gc.freeze() and rarer gen-2 collections")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    port = free_port()
    listen = f"127.0.0.1:{port}"
    with bench_stores() as stores, tempfile.TemporaryDirectory() as home:
        extra = {"CREDITD_SLICE_SECONDS": str(args.slice), "CREDITD_LOG_LEVEL": "warning"}
        env = creditd_env(stores, listen, **extra)
        if args.store == "embedded":
            del env["CREDITD_REDIS_URL"]
            env["CREDITD_DATABASE_URL"] = f"sqlite+aiosqlite:///{home}/creditd.db"
        env["HOME"] = home
        flags = ["--uvloop"] if args.loop == "uvloop" else []
        flags += ["--gc-log"] if args.gc_log else []
        flags += ["--gc-freeze"] if args.gc_freeze else []
        server = Server(["creditd", *flags], env)
        generators: list[subprocess.Popen[str]] = []
        try:
            per_client = -(-args.sessions // args.clients)
            asyncio.run(_setup(listen, args.clients, args.poor_clients, per_client))
            ramp_started = time.monotonic()
            share = -(-args.sessions // args.loadgen_procs)
            for p in range(args.loadgen_procs):
                first = p * share
                count = min(share, args.sessions - first)
                generators.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            str(Path(__file__).resolve()),
                            "load",
                            "--target",
                            listen,
                            "--name",
                            f"g{p}",
                            "--count",
                            str(count),
                            "--first",
                            str(first),
                            "--clients",
                            str(args.clients),
                            "--report-every",
                            str(args.report_every),
                            "--ramp-concurrency",
                            str(args.ramp_concurrency),
                        ],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                )
            ready = 0
            for generator in generators:
                assert generator.stdout is not None
                ready += json.loads(generator.stdout.readline())["ready"]
            ramp = time.monotonic() - ramp_started
            print(f"{ready} sessions live after a {ramp:.1f}s ramp; holding for {args.hold:g}s", flush=True)
            # measure the steady state: all sessions up, reporting, renewing, some cut off
            window = args.hold
            pg_before = _pg_counters(stores.database_url) if args.store == "redis" else {}
            window_from = time.time()
            cpu_before, started = cpu_seconds(server.pid), time.monotonic()
            load_before = sum(cpu_seconds(g.pid) for g in generators)
            spy = None
            if args.profile:
                command = ["py-spy", "record", "--pid", str(server.pid), "--rate", "200", "--format", "raw"]
                spy = subprocess.Popen(
                    [*command, "--duration", str(int(min(window, 30))), "--output", args.profile],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            rss_peak = 0
            while time.monotonic() - started < window:
                rss_peak = max(rss_peak, rss_bytes(server.pid))
                time.sleep(1.0)
            cores = (cpu_seconds(server.pid) - cpu_before) / (time.monotonic() - started)
            loadgen_cores = (sum(cpu_seconds(g.pid) for g in generators) - load_before) / (time.monotonic() - started)
            if spy is not None:
                spy.wait(120)
            pg_after = _pg_counters(stores.database_url) if args.store == "redis" else {}
            window_to = time.time()
            reports: list[dict[str, Any]] = []
            for generator in generators:  # hang up
                assert generator.stdin is not None
                generator.stdin.write("stop\n")
                generator.stdin.flush()
            for generator in generators:
                out, _ = generator.communicate(timeout=600)
                reports.append(json.loads(out.strip().splitlines()[-1]))
            rss_end = rss_bytes(server.pid)
            server_warnings = [line for line in server.output().splitlines() if '"level": "' in line][-5:]
            gc_pauses = [line for line in server.output().splitlines() if line.startswith("gc pause")]
            reconciled = _reconcile(env) if args.store == "redis" else "not applicable (embedded)"
        finally:
            for generator in generators:
                if generator.poll() is None:
                    generator.kill()
            server.kill()

    total = {
        key: sum(r[key] for r in reports)
        for key in (
            "started",
            "denied",
            "errors",
            "renewals",
            "reports",
            "summaries",
            "cutoffs",
            "overspent_seconds",
            "unfinished",
        )
    }
    lateness = sorted(x for r in reports for x in r["cutoff_lateness_ms"])
    result: dict[str, Any] = {
        "machine": machine(),
        "store": args.store,
        "loop": args.loop,
        "sessions": args.sessions,
        "report_every": args.report_every,
        "slice": args.slice,
        "ramp_seconds": round(ramp, 1),
        "window_seconds": round(window, 1),
        "server_cores": round(cores, 3),
        "loadgen_cores": round(loadgen_cores, 3),
        "server_rss_peak_mb": round(rss_peak / 2**20, 1),
        "server_rss_end_mb": round(rss_end / 2**20, 1),
        **total,
        "cutoff_reasons": sorted({x for r in reports for x in r["cutoff_reasons"]}),
        "error_kinds": sorted({x for r in reports for x in r["error_kinds"]}),
        "error_details": {k: round(v - window_from, 1) for r in reports for k, v in r["error_details"].items()},
        "server_log_tail": server_warnings,
        "gc_pauses_over_50ms": len(gc_pauses),
        "gc_pause_longest": max(gc_pauses, key=lambda line: int(line.split()[-2]), default=""),
        "cutoff_lateness_ms": {
            "p50": round(percentile(lateness, 0.5), 1),
            "p99": round(percentile(lateness, 0.99), 1),
            "max": round(lateness[-1], 1) if lateness else None,
            "min": round(lateness[0], 1) if lateness else None,
        },
        "reconcile": reconciled,
    }

    def in_window(key: str) -> int:
        return sum(n for r in reports for second, n in r[key].items() if window_from <= int(second) < window_to)

    renewals, usage_reports = in_window("renewals_by_second"), in_window("reports_by_second")
    result["window"] = {"renewals": renewals, "usage_reports": usage_reports}
    if pg_before:
        delta = {key: pg_after[key] - pg_before.get(key, 0) for key in pg_after}
        rows = sum(v for k, v in delta.items() if k.endswith("_rows"))
        result["window"].update(
            postgres=delta,
            rows_per_renewal=round(rows / renewals, 2) if renewals else None,
            commits_per_renewal=round(delta["commits"] / renewals, 3) if renewals else None,
            session_rows_per_renewal=round(delta.get("sessions_rows", 0) / renewals, 2) if renewals else None,
            rows_per_usage_report=round(rows / usage_reports, 3) if usage_reports else None,
        )
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def _reconcile(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "creditd.cli", "reconcile"], env=env, capture_output=True, text=True, timeout=300
    )
    lines = done.stdout.strip().splitlines()
    return f"exit {done.returncode}: {lines[-1] if lines else done.stderr.strip()[-200:]}"


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
    os._exit(0)
