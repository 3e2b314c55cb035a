"""Many concurrent voice sessions against one creditd process, against SPEC §8's targets.

N sessions (--sessions, 10,000) are authorized and answered, evenly over --ramp-seconds
(one slice, so that their slices end and renew evenly, as a steady state of calls does),
then each reports its cumulative seconds every --report-every seconds (5) for --hold
seconds, while --new-calls (200) new calls a second are authorized alongside. Some
sessions run out of money during the hold and must be cut by the server with a Cutoff at
the end of their last grant, driven by its own timer. Two ways to run dry (--scenario):

  spread  --poor-clients of the --clients client accounts (40 of 200) pay for about 1.5
          slices per session: their sessions run dry one by one, spread over a slice;
  pool    a fifth of the sessions (--dry-share) belong to the clients of a second agency
          whose pool pays a whole number of slices for each of them. They are authorized
          last in the ramp and answered together when the hold begins, so their grants end
          together and the pool runs out for all of them at one moment: every one of them
          is cut in the same second or two.

The new calls are authorized on other, well funded clients, then answered and hung up at
once (SessionStart, SessionEnd at 0 s): they add Authorize and stream work without growing
the live set. Their Authorize latency is what is reported.

Measured over the hold (all sessions live):
  * the server process's CPU (cores) and RSS peak;
  * Authorize latency of the new calls, p50/p99/max, and how many took over 25 ms at the
    caller (by second of the hold) and inside the server's handler;
  * cutoff lateness: when each Cutoff arrived after the end of the session's last grant
    (Grant.expires_at), p50/p99/max, and overspent seconds: billed beyond what was granted
    (plus a reconcile, on Redis + Postgres);
  * event-loop stalls and GC pauses from the server's own metrics (CREDITD_METRICS_LISTEN):
    heartbeats and collections over 20 ms during the hold, and the worst since start;
  * Postgres writes against slice renewals and usage reports (Redis + Postgres only).
Then each target of SPEC §8 is printed, met or NOT MET.

The sessions' load generator runs in --loadgen-procs separate processes (2), each with its
share of the sessions over its own channels (at most 200 streams per HTTP/2 connection);
the new calls come from one more process.

    python bench/sessions.py                            # 10,000 sessions, Redis + Postgres
    python bench/sessions.py --store embedded           # in-process hot state, SQLite
    python bench/sessions.py --scenario pool            # a fifth run dry in the same second
    python bench/sessions.py --slice-seconds 10         # short slices
    python bench/sessions.py --sessions 200 --hold 20   # a quick look
    python bench/sessions.py --server bare              # the same load, gRPC alone (no work)

Needs the machine's Postgres (CREDITD_BENCH_POSTGRES_ADMIN_URL) and Redis (CREDITD_BENCH_REDIS_URL).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    ADMIN_TOKEN,
    Sample,
    Server,
    bench_stores,
    commands_per_write,
    cpu_seconds,
    creditd_env,
    free_port,
    machine,
    percentile,
    rss_bytes,
    sample_sum,
    scrape,
)

CREDIT = 1_000_000  # every rate here is 1 credit a minute
STREAMS_PER_CHANNEL = 200
STALL_SECONDS = 0.02  # SPEC §8: no event-loop stall over 20 ms
STALL_BUCKET = "0.02"  # ... a bucket boundary of creditd's lateness and GC-pause histograms
AUTHORIZE_TARGET_SECONDS = 0.025  # SPEC §8: Authorize p99 <= 25 ms
AUTHORIZE_BUCKET = "0.025"  # ... a bucket boundary of the server's RPC duration histogram


def _percentiles(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p99": None, "max": None}
    return {
        "p50": round(percentile(ordered, 0.5), 1),
        "p99": round(percentile(ordered, 0.99), 1),
        "max": round(ordered[-1], 1),
    }


def _commands() -> asyncio.Queue[str]:
    """Lines the orchestrator writes to this process's stdin, as they come."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line.strip())
        loop.call_soon_threadsafe(queue.put_nowait, "stop")

    loop.run_in_executor(None, read)
    return queue


# -- the sessions' load generator (its own processes) -------------------------------------


class Session:
    def __init__(self, session_id: str, client_id: str, dry: bool) -> None:
        self.session_id = session_id
        self.client_id = client_id
        self.dry = dry  # of the agency whose pool runs out (--scenario pool)
        self.authorized = False
        self.granted = 0
        self.grant_end = 0.0  # wall clock end of the last grant (Grant.expires_at)
        self.grants = 0
        self.reports = 0
        self.started = 0.0
        self.final: Any = None
        self.final_kind = ""
        self.final_at = 0.0
        self.error = ""


def _own_collector() -> Callable[[], float]:
    """Tune this load generator's garbage collector as `creditd serve` tunes its own
    (creditd.gc_tuning). Thousands of open calls in one process pause it for hundreds of
    milliseconds otherwise (its calls' pending reads fill the young generation as the
    server's do), and it would count its own pauses as the server's lateness. Returns a
    function that gives its longest collection since, in ms (creditd.stalls' probe)."""
    from opentelemetry.metrics import NoOpMeter

    from creditd.gc_tuning import Collector
    from creditd.stalls import StallWatch

    Collector(asyncio.get_running_loop())  # the loop's timer keeps it
    watch = StallWatch(NoOpMeter("bench"))
    watch.start()
    return lambda: round(max(watch.gc_pause_max) * 1000, 1)


async def _load(args: argparse.Namespace) -> dict[str, Any]:
    import grpc
    from creditd_client.v1 import common_pb2, metering_pb2, metering_pb2_grpc

    longest_pause = _own_collector()
    count = args.count
    channels = [
        grpc.aio.insecure_channel(args.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, -(-count // STREAMS_PER_CHANNEL)))
    ]
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), 30)
    stubs = [metering_pb2_grpc.MeteringServiceStub(channel) for channel in channels]
    metadata = (("authorization", f"Bearer {args.token}"),)
    sessions = []
    for i in range(count):
        client = (args.first + i) % args.clients
        sessions.append(Session(f"{args.name}-{i}", f"c{client}", client >= args.dry_from))
    # The dry sessions are authorized last, so that none of their authorizations expires
    # before the hold begins and answers them all at once.
    sessions.sort(key=lambda s: s.dry)
    commands = _commands()
    stop = asyncio.Event()
    answer_dry = asyncio.Event()
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

    async def answer(stub: Any, session: Session) -> Any:
        call = stub.StreamUsage(metadata=metadata)
        start = metering_pb2.SessionStart(
            session_id=session.session_id, client_id=session.client_id, channel=common_pb2.CHANNEL_VOICE
        )
        await call.write(metering_pb2.StreamUsageRequest(start=start))
        session.started = time.monotonic()
        return call

    ramp_started = time.monotonic()

    async def run(number: int, session: Session) -> None:
        nonlocal denied
        stub = stubs[number % len(stubs)]
        await asyncio.sleep(max(0.0, ramp_started + number * args.ramp_seconds / count - time.monotonic()))
        async with gate:
            try:
                response = await stub.Authorize(
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
            if not response.allowed:
                denied += 1
                return
            session.authorized = True
            call = None if session.dry else await answer(stub, session)
        if call is None:
            await answer_dry.wait()
            call = await answer(stub, session)

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
            # whether the server was due to cut the call then (its grant had ended): a write
            # that crosses the server's end of the call fails at the caller
            due = "grant ended" if time.time() >= session.grant_end else "within its grant"
            details[f"{exc.code().name}: {exc.details()} ({due})"[:200]] = time.time()
        finally:
            reporter.cancel()

    tasks = [asyncio.create_task(run(i, s)) for i, s in enumerate(sessions)]
    while sum(1 for s in sessions if s.started or s.error or (s.dry and s.authorized)) + denied < count:  # noqa: ASYNC110
        await asyncio.sleep(0.25)
    print(json.dumps({"ready": sum(1 for s in sessions if s.authorized)}), flush=True)
    while (command := await commands.get()) != "stop":  # the orchestrator says when
        if command == "answer-dry":
            answer_dry.set()
    answer_dry.set()  # (if never answered, they are hung up at once)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    cutoffs = [s for s in sessions if s.final_kind == "cutoff"]
    dry_ends = [s.grant_end for s in sessions if s.dry and s.final_kind == "cutoff"]
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
        "dry_cutoffs": len(dry_ends),
        "dry_grant_ends": [min(dry_ends), max(dry_ends)] if dry_ends else [],
        "cutoff_reasons": sorted({int(s.final.cutoff.reason) for s in cutoffs}),
        "cutoff_lateness_ms": [[s.grant_end, (s.final_at - s.grant_end) * 1000] for s in cutoffs],  # [when, ms]
        "overspent_seconds": sum(max(0, s.final.cutoff.billed_seconds - s.granted) for s in cutoffs)
        + sum(max(0, s.final.summary.billed_seconds - s.granted) for s in sessions if s.final_kind == "summary"),
        "unfinished": sum(1 for s in sessions if s.started and s.final is None),
        "error_details": details,
        "gc_pause_max_ms": longest_pause(),
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
    parser.add_argument("--dry-from", type=int, required=True, help="clients from this number on are dry")
    parser.add_argument("--report-every", type=float, default=5.0)
    parser.add_argument("--ramp-concurrency", type=int, default=32)
    parser.add_argument("--ramp-seconds", type=float, default=0.0)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_load(args))), flush=True)


# -- the new calls (one more process) -----------------------------------------------------


async def _new_calls(args: argparse.Namespace) -> dict[str, Any]:
    """--rate calls a second, on schedule whatever the answers take: each one authorized
    (timed), answered and hung up at once."""
    import grpc
    from creditd_client.v1 import common_pb2, metering_pb2, metering_pb2_grpc

    longest_pause = _own_collector()
    channels = [grpc.aio.insecure_channel(args.target) for _ in range(args.channels)]
    stubs = [metering_pb2_grpc.MeteringServiceStub(channel) for channel in channels]
    metadata = (("authorization", f"Bearer {args.token}"),)
    clients = [f"c{i}" for i in range(args.client_from, args.client_to)]
    run = uuid.uuid4().hex[:8]
    latencies: list[float] = []
    launch_lateness: list[float] = []
    slow_at: collections.Counter[int] = collections.Counter()  # second of the run -> calls over 25 ms
    errors: dict[str, int] = {}
    error_details: dict[str, str] = {}  # status -> the details of its first occurrence, and where
    denied = 0
    loop = asyncio.get_running_loop()

    async def call(number: int) -> None:
        nonlocal denied
        stub = stubs[number % len(stubs)]
        session_id, client_id = f"new-{run}-{number}", clients[number % len(clients)]
        started = loop.time()
        stage = "Authorize"
        try:
            response = await stub.Authorize(
                metering_pb2.AuthorizeRequest(
                    session_id=session_id,
                    client_id=client_id,
                    channel=common_pb2.CHANNEL_VOICE,
                    direction=common_pb2.DIRECTION_INBOUND,
                ),
                metadata=metadata,
                timeout=30,
            )
            latencies.append(loop.time() - started)
            if latencies[-1] > AUTHORIZE_TARGET_SECONDS:
                slow_at[int(started - begin)] += 1
            stage = "StreamUsage"
            if not response.allowed:
                denied += 1
                return
            stream = stub.StreamUsage(metadata=metadata)
            start = metering_pb2.SessionStart(
                session_id=session_id, client_id=client_id, channel=common_pb2.CHANNEL_VOICE
            )
            await stream.write(metering_pb2.StreamUsageRequest(start=start))
            await stream.write(metering_pb2.StreamUsageRequest(end=metering_pb2.SessionEnd(seconds_used=0)))
            while await stream.read() is not grpc.aio.EOF:  # a grant, the summary, the end
                pass
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
            error_details.setdefault(exc.code().name, f"{stage}: {exc.details()}"[:200])

    commands = _commands()
    stopping = asyncio.ensure_future(commands.get())  # any line ends the run
    tasks: set[asyncio.Task[None]] = set()
    begin = loop.time()
    number = 0
    while not stopping.done():
        due = begin + number / args.rate
        await asyncio.wait({stopping}, timeout=max(0.0, due - loop.time()))
        if stopping.done():
            break
        launch_lateness.append(loop.time() - due)
        task = asyncio.create_task(call(number))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        number += 1
    seconds = loop.time() - begin
    await asyncio.gather(*tasks)
    for channel in channels:
        await channel.close()
    return {
        "calls": number,
        "seconds": round(seconds, 1),
        "rate": round(number / seconds, 1) if seconds else 0,
        "authorize_ms": _percentiles([x * 1000 for x in latencies]),
        "launch_lateness_ms": _percentiles([x * 1000 for x in launch_lateness]),
        "over_25ms_by_second": dict(sorted(slow_at.items())),
        "denied": denied,
        "errors": errors,
        "error_details": error_details,
        "gc_pause_max_ms": longest_pause(),
    }


def new_calls_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="sessions.py newcalls")
    parser.add_argument("--target", required=True)
    parser.add_argument("--token", default=ADMIN_TOKEN)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--client-from", type=int, required=True)
    parser.add_argument("--client-to", type=int, required=True)
    parser.add_argument("--channels", type=int, default=4)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_new_calls(args))), flush=True)


# -- the orchestrator ---------------------------------------------------------------------


def _slice_cost(seconds: int) -> int:
    """Micros for `seconds` of a call at 1 credit a minute (cumulative rounding, SPEC §3)."""
    return -(-CREDIT * seconds // 60)


async def _setup(address: str, args: argparse.Namespace, plan: dict[str, Any]) -> None:
    """Agency "a" with the well funded and the poor clients; agency "dry" with the dry
    clients, its pool paying `plan["dry_slices"]` slices for each of their sessions."""
    import grpc
    from creditd_client.v1 import account_pb2, account_pb2_grpc, common_pb2, ledger_pb2, ledger_pb2_grpc

    metadata = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        pools = {"a": 10**13}
        if plan["dry_sessions"]:
            pools["dry"] = plan["dry_sessions"] * _slice_cost(plan["dry_slices"] * args.slice)
        for agency, pool in pools.items():
            await accounts.CreateAgency(
                account_pb2.CreateAgencyRequest(
                    agency_id=agency, free_voice_micros=pool, default_voice_micros_per_minute=CREDIT
                ),
                metadata=metadata,
            )
            await accounts.CreatePlan(
                account_pb2.CreatePlanRequest(
                    agency_id=agency,
                    plan_id=f"p-{agency}",
                    default_voice_micros_per_minute=CREDIT,
                    default_sms_micros_per_segment=1,
                ),
                metadata=metadata,
            )
        per_client = -(-args.sessions // args.clients)
        for i in range(args.clients):
            agency = "dry" if i >= plan["dry_from"] else "a"
            await accounts.CreateClient(
                account_pb2.CreateClientRequest(
                    client_id=f"c{i}",
                    agency_id=agency,
                    plan_id=f"p-{agency}",
                    billing_mode=common_pb2.BILLING_MODE_REBILLING,
                ),
                metadata=metadata,
            )
            # poor clients pay for about 1.5 slices per session: they run dry mid-run
            amount = per_client * _slice_cost(args.slice) * 3 // 2 if i < plan["poor"] else 10**12
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


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    """Which clients are poor (spread) or dry (pool), and how many slices the dry pool pays."""
    if args.scenario == "spread":
        return {"poor": args.poor_clients, "dry_from": args.clients, "dry_sessions": 0, "dry_slices": 0}
    dry_clients = max(1, round(args.clients * args.dry_share))
    dry_from = args.clients - dry_clients
    sessions_by_client = [len(range(c, args.sessions, args.clients)) for c in range(args.clients)]
    # the pool runs out about halfway through the hold, at the end of a slice
    dry_slices = max(1, int(args.hold / 2 // args.slice))
    if dry_slices * args.slice >= args.hold - 2:
        raise SystemExit(f"--hold {args.hold:g} is too short for the pool to run out: more than {args.slice + 2} s")
    return {
        "poor": 0,
        "dry_from": dry_from,
        "dry_sessions": sum(sessions_by_client[dry_from:]),
        "dry_slices": dry_slices,
    }


def _pg_counters(conninfo: str) -> dict[str, int]:
    import psycopg

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


def _over_stall(before: list[Sample], after: list[Sample], name: str, bucket: str = STALL_BUCKET, **labels: str) -> int:
    """Observations of histogram `name` above `bucket` (STALL_SECONDS) between two scrapes."""

    def over(samples: list[Sample]) -> float:
        every = sample_sum(samples, f"{name}_bucket", le="+Inf", **labels)
        return every - sample_sum(samples, f"{name}_bucket", le=bucket, **labels)

    return round(over(after) - over(before))


def _stalls(before: list[Sample], after: list[Sample]) -> dict[str, Any]:
    """The server's own figures (creditd.stalls): over the hold, and worst since start."""
    lateness = "creditd_event_loop_lateness_seconds"
    pauses = "creditd_gc_pause_seconds"
    generations = ("0", "1", "2")
    return {
        "heartbeats": round(sample_sum(after, f"{lateness}_count") - sample_sum(before, f"{lateness}_count")),
        "heartbeats_over_20ms": _over_stall(before, after, lateness),
        "gc_collections": {
            g: round(
                sample_sum(after, "creditd_gc_collections_total", generation=g)
                - sample_sum(before, "creditd_gc_collections_total", generation=g)
            )
            for g in generations
        },
        "gc_pauses_over_20ms": {g: _over_stall(before, after, pauses, generation=g) for g in generations},
        "gc_pause_seconds_total": round(sample_sum(after, f"{pauses}_sum") - sample_sum(before, f"{pauses}_sum"), 3),
        "redis_commands_per_write": commands_per_write(before, after),
        # time inside the handler only: a call over 25 ms at the caller but not here waited
        # outside it (accepted late, or its answer sent late)
        "authorize_handler_over_25ms": _over_stall(
            before, after, "rpc_server_call_duration_seconds", AUTHORIZE_BUCKET, rpc_method="Authorize"
        ),
        "since_start": {
            "loop_lateness_max_ms": round(sample_sum(after, "creditd_event_loop_lateness_max_seconds") * 1000, 1),
            "gc_pause_max_ms": {
                g: round(sample_sum(after, "creditd_gc_pause_max_seconds", generation=g) * 1000, 1) for g in generations
            },
        },
    }


def _command(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def _tell(processes: list[subprocess.Popen[str]], line: str) -> None:
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(line + "\n")
        process.stdin.flush()


def _last_json(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = process.communicate(timeout=600)
    lines = out.strip().splitlines()
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"a load generator failed (exit {process.returncode})")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("load", "newcalls"):
        (load_main if sys.argv[1] == "load" else new_calls_main)(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--scenario", choices=("spread", "pool"), default="spread", help="how sessions run dry")
    parser.add_argument("--poor-clients", type=int, default=40, help="spread: clients whose sessions run dry")
    parser.add_argument("--dry-share", type=float, default=0.2, help="pool: share of the sessions that run dry")
    parser.add_argument("--report-every", type=float, default=5.0)
    parser.add_argument("--hold", type=float, default=150.0, help="seconds all sessions stay up after the ramp")
    parser.add_argument("--slice-seconds", "--slice", dest="slice", type=int, default=60, help="CREDITD_SLICE_SECONDS")
    parser.add_argument("--renewal-lead", type=float, help="CREDITD_RENEWAL_LEAD_SECONDS (default: the server's)")
    parser.add_argument("--new-calls", type=float, default=200, help="new calls authorized a second during the hold")
    parser.add_argument("--store", choices=("redis", "embedded"), default="redis")
    parser.add_argument(
        "--server",
        choices=("creditd", "bare"),
        default="creditd",
        help="bare: the same load on a grpc.aio servicer that does no work (bench/servers.py), gRPC's own cost",
    )
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the server's event loop")
    parser.add_argument("--loadgen-procs", type=int, default=2)
    parser.add_argument("--ramp-concurrency", type=int, default=32, help="Authorize calls in flight per load process")
    parser.add_argument(
        "--ramp-seconds",
        type=float,
        help="authorize the sessions evenly over this long (default: one slice, so that their slices end, and renew,"
        " evenly, as a steady state of calls does); 0: as fast as --ramp-concurrency allows, and every renewal of"
        " the hold comes in one wave",
    )
    parser.add_argument(
        "--load-nice",
        type=int,
        default=0,
        help="run the sessions' load processes at this niceness (not the new calls' process): on a machine whose"
        " cores the load fills, the server, Redis and Postgres then run first, as beside callers on other hosts",
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--profile",
        help="py-spy raw profile of the server written here: 30 s of the hold, or the 8 s around the pool's burst",
    )
    args = parser.parse_args()
    plan = _plan(args)
    if args.new_calls and plan["poor"] >= min(args.clients, plan["dry_from"]):
        raise SystemExit("no well funded client is left for the new calls")

    print(f"machine: {machine()}")
    listen, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    database: Literal["creditd", "none"] = "creditd" if args.store == "redis" else "none"
    with bench_stores(database) as stores, tempfile.TemporaryDirectory() as home:
        extra = {"CREDITD_SLICE_SECONDS": str(args.slice), "CREDITD_LOG_LEVEL": "warning"}
        if args.renewal_lead is not None:
            extra["CREDITD_RENEWAL_LEAD_SECONDS"] = str(args.renewal_lead)
        env = creditd_env(stores, listen, CREDITD_METRICS_LISTEN=metrics, **extra)
        if args.store == "embedded":
            del env["CREDITD_REDIS_URL"]
            env["CREDITD_DATABASE_URL"] = f"sqlite+aiosqlite:///{home}/creditd.db"
        env["HOME"] = home
        flags = ["--uvloop"] if args.loop == "uvloop" else []
        bare = args.server == "bare"
        server = Server(["bare", "--listen", listen, *flags] if bare else ["creditd", *flags], env)
        generators: list[subprocess.Popen[str]] = []
        new_calls: subprocess.Popen[str] | None = None
        try:
            if not bare:
                asyncio.run(_setup(listen, args, plan))
            ramp_started = time.monotonic()
            share = -(-args.sessions // args.loadgen_procs)
            for p in range(args.loadgen_procs):
                first = p * share
                command = _command(
                    "load",
                    *("--target", listen, "--name", f"g{p}", "--first", str(first)),
                    *("--count", str(min(share, args.sessions - first)), "--clients", str(args.clients)),
                    *("--dry-from", str(plan["dry_from"]), "--report-every", str(args.report_every)),
                    *("--ramp-concurrency", str(args.ramp_concurrency)),
                    *("--ramp-seconds", str(args.slice if args.ramp_seconds is None else args.ramp_seconds)),
                )
                if args.load_nice:
                    command = ["nice", "-n", str(args.load_nice), *command]
                generators.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            ready = 0
            for generator in generators:
                assert generator.stdout is not None
                ready += json.loads(generator.stdout.readline())["ready"]
            ramp = time.monotonic() - ramp_started
            print(f"{ready} sessions authorized after a {ramp:.1f}s ramp; holding for {args.hold:g}s", flush=True)
            # the steady state: all sessions up, reporting, renewing, some cut off
            window = args.hold
            measured = not bare and args.store == "redis"  # Postgres counters and a reconcile
            pg_before = _pg_counters(stores.conninfo) if measured else {}
            metrics_before = [] if bare else scrape(metrics)
            window_from = time.time()
            cpu_before, started = cpu_seconds(server.pid), time.monotonic()
            load_before = sum(cpu_seconds(g.pid) for g in generators)
            _tell(generators, "answer-dry")
            if args.new_calls:
                command = _command(
                    "newcalls",
                    *("--target", listen, "--rate", str(args.new_calls)),
                    *("--client-from", str(plan["poor"]), "--client-to", str(plan["dry_from"])),
                )
                new_calls = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            spy: subprocess.Popen[bytes] | None = None
            # pool: the seconds around the moment the pool runs out; spread: the first 30 s
            profile_from = max(0, plan["dry_slices"] * args.slice - 2) if plan["dry_sessions"] else 0
            profile_for = 8 if plan["dry_sessions"] else int(min(window, 30))
            rss_peak = 0
            while time.monotonic() - started < window:
                if args.profile and spy is None and time.monotonic() - started >= profile_from:
                    command = ["py-spy", "record", "--pid", str(server.pid), "--rate", "200", "--format", "raw"]
                    spy = subprocess.Popen(
                        [*command, "--duration", str(profile_for), "--output", args.profile],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                rss_peak = max(rss_peak, rss_bytes(server.pid))
                time.sleep(1.0)
            cores = (cpu_seconds(server.pid) - cpu_before) / (time.monotonic() - started)
            loadgen_cores = (sum(cpu_seconds(g.pid) for g in generators) - load_before) / (time.monotonic() - started)
            metrics_after = [] if bare else scrape(metrics)
            pg_after = _pg_counters(stores.conninfo) if measured else {}
            window_to = time.time()
            new_calls_report: dict[str, Any] = {}
            if new_calls is not None:
                _tell([new_calls], "stop")
                new_calls_report = _last_json(new_calls)
            if spy is not None:
                spy.wait(120)
            _tell(generators, "stop")  # hang up
            reports = [_last_json(generator) for generator in generators]
            rss_end = rss_bytes(server.pid)
            server_warnings = [line for line in server.output().splitlines() if '"level": "' in line][-5:]
            reconciled = _reconcile(env) if measured else f"not applicable ({'bare' if bare else 'embedded'})"
        finally:
            for process in [*generators, *([new_calls] if new_calls else [])]:
                if process.poll() is None:
                    process.kill()
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
            "dry_cutoffs",
            "overspent_seconds",
            "unfinished",
        )
    }
    dry_ends = [t for r in reports for t in r["dry_grant_ends"]]
    cuts = [(end, ms) for r in reports for end, ms in r["cutoff_lateness_ms"]]
    in_hold = [ms for end, ms in cuts if window_from <= end <= window_to]
    outside = [ms for end, ms in cuts if not window_from <= end <= window_to]
    result: dict[str, Any] = {
        "machine": machine(),
        "server": args.server,
        "store": "none" if bare else args.store,
        "loop": args.loop,
        "scenario": args.scenario,
        "sessions": args.sessions,
        "report_every": args.report_every,
        "slice_seconds": args.slice,
        "ramp_seconds": round(ramp, 1),
        "window_seconds": round(window, 1),
        "server_cores": round(cores, 3),
        "loadgen_cores": round(loadgen_cores, 3),
        "loadgen_gc_pause_max_ms": max(r.get("gc_pause_max_ms", 0.0) for r in [*reports, new_calls_report]),
        "server_rss_peak_mb": round(rss_peak / 2**20, 1),
        "server_rss_end_mb": round(rss_end / 2**20, 1),
        **total,
        "cutoff_reasons": sorted({x for r in reports for x in r["cutoff_reasons"]}),
        # over the hold, as every other figure: a cut whose grant ended in the ramp (the
        # load processes still busy authorizing) is reported apart
        "cutoffs_in_hold": len(in_hold),
        "cutoff_lateness_ms": _percentiles(in_hold),
        "cutoff_lateness_ms_outside_hold": _percentiles(outside),
        "new_calls": new_calls_report,
        "stalls": _stalls(metrics_before, metrics_after) if metrics_after else None,
        "error_kinds": sorted({x for r in reports for x in r["error_kinds"]}),
        "error_details": {k: round(v - window_from, 1) for r in reports for k, v in r["error_details"].items()},
        "server_log_tail": server_warnings,
        "reconcile": reconciled,
    }
    if plan["dry_sessions"]:
        result["pool"] = {
            "dry_sessions": plan["dry_sessions"],
            "slices_paid_each": plan["dry_slices"],
            "grant_ends_spread_seconds": round(max(dry_ends) - min(dry_ends), 2) if dry_ends else None,
        }

    def in_window(key: str) -> int:
        return sum(n for r in reports for second, n in r[key].items() if window_from <= int(second) < window_to)

    renewals, usage_reports = in_window("renewals_by_second"), in_window("reports_by_second")
    # a slice is reserved by each renewal and by each new call's Authorize
    slices = renewals + new_calls_report.get("calls", 0)
    result["window"] = {"renewals": renewals, "slices": slices, "usage_reports": usage_reports}
    if pg_before:
        delta = {key: pg_after[key] - pg_before.get(key, 0) for key in pg_after}
        rows = sum(v for k, v in delta.items() if k.endswith("_rows"))
        result["window"].update(
            postgres=delta,
            rows_per_slice=round(rows / slices, 2) if slices else None,
            commits_per_slice=round(delta["commits"] / slices, 3) if slices else None,
            session_rows_per_slice=round(delta.get("sessions_rows", 0) / slices, 2) if slices else None,
            rows_per_usage_report=round(rows / usage_reports, 3) if usage_reports else None,
        )
    print(json.dumps(result, indent=2))
    print("\n".join(targets(result, args)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def targets(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Each target of SPEC §8 this run measures: the figure, and met or NOT MET."""
    lateness, stalls = result["cutoff_lateness_ms"], result["stalls"]
    authorize = result["new_calls"].get("authorize_ms", {})
    slow = sum(result["new_calls"].get("over_25ms_by_second", {}).values())
    checks: list[tuple[str, str, bool | None]] = [
        ("server CPU <= 0.3 core", f"{result['server_cores']:.2f} cores", result["server_cores"] <= 0.3),
        ("server RSS <= 250 MB", f"{result['server_rss_peak_mb']:.0f} MB peak", result["server_rss_peak_mb"] <= 250),
        (
            f"Authorize p99 <= 25 ms at {args.new_calls:g} new calls/s",
            f"p50 {authorize.get('p50')} / p99 {authorize.get('p99')} ms"
            f" ({result['new_calls'].get('rate', 0)} calls/s; over 25 ms: {slow} at the caller"
            f", {'?' if stalls is None else stalls['authorize_handler_over_25ms']} in the handler)",
            None if authorize.get("p99") is None else authorize["p99"] <= 25,
        ),
        (
            "cutoff lateness p99 <= 50 ms",
            f"p50 {lateness['p50']} / p99 {lateness['p99']} ms ({result['cutoffs_in_hold']} cutoffs in the hold"
            f", {result['cutoffs'] - result['cutoffs_in_hold']} outside it)",
            None if lateness["p99"] is None else lateness["p99"] <= 50,
        ),
        (
            "cutoff lateness max <= 100 ms",
            f"max {lateness['max']} ms",
            None if lateness["max"] is None else lateness["max"] <= 100,
        ),
        ("zero overspent seconds", f"{result['overspent_seconds']} s", result["overspent_seconds"] == 0),
    ]
    if stalls is None:
        checks.append(("no event-loop stall over 20 ms", "(the bare servicer has no probe)", None))
    else:
        gc_over = sum(stalls["gc_pauses_over_20ms"].values())
        checks.append(
            (
                "no event-loop stall over 20 ms",
                f"{stalls['heartbeats_over_20ms']} heartbeats and {gc_over} GC pauses over 20 ms in the hold;"
                f" worst since start: loop {stalls['since_start']['loop_lateness_max_ms']} ms,"
                f" GC {max(stalls['since_start']['gc_pause_max_ms'].values())} ms",
                stalls["heartbeats_over_20ms"] == 0 and gc_over == 0,
            )
        )
    commits = result["window"].get("commits_per_slice")
    if "postgres" in result["window"]:
        checks.append(
            (
                "<= 1 batched durable write per slice",
                f"{commits} commits and {result['window']['rows_per_slice']} rows per slice",
                None if commits is None else commits <= 1,
            )
        )
    scenario = f"{args.scenario}, {args.slice} s slices, {args.sessions} sessions, {result['store']}"
    if args.server == "bare":
        scenario += ", bare gRPC servicer: no cutoffs, renewals or warnings"
    lines = [f"SPEC §8 targets ({scenario}):"]
    for what, figure, met in checks:
        verdict = "not measured" if met is None else "met" if met else "NOT MET"
        lines.append(f"  {what:<42} {verdict:<12} {figure}")
    if args.sessions < 10_000 or args.new_calls < 200:
        lines.append("  (the targets are set for 10,000 sessions and 200 new calls a second)")
    lines.append(f"  (the load generators' own longest GC pause: {result['loadgen_gc_pause_max_ms']} ms)")
    return lines


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
