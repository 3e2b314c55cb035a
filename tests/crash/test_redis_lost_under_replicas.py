"""Redis loses its data under two `creditd serve` replicas that share it and one Postgres.

Two real processes on one Redis of the test's own, both under load: top-ups on each
replica (keys of its own), GetBalance and Authorize (released at once) of existing
accounts, and a few live calls. Then Redis loses everything: (a) FLUSHALL, or (b) its
process restarted empty. SPEC §7 ("Nothing lost", "Fail closed") and the guarantees of a
loss under replicas:

* no answer is ever NOT_FOUND for an account or client that exists: until its state is
  rebuilt, what needs it is UNAVAILABLE (retryable);
* a Topup that Postgres committed is answered OK or UNAVAILABLE, never another error;
* once the rebuild ends, every committed top-up is in Redis whichever replica answered
  it, and `creditd reconcile` is clean with no client retrying anything;
* both replicas' readiness goes NOT_SERVING during the loss and is SERVING afterwards;
* both replicas log the loss they saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from creditd_client.v1 import common_pb2, ledger_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import CREDIT, Api
from tests.crash.conftest import FAST, Stores
from tests.crash.procs import (
    ADMIN_TOKEN,
    Ledger,
    RedisServer,
    Serve,
    creditd_env,
    free_port,
    open_channel,
    reconcile,
)
from tests.crash.workload import LiveCall

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READINESS = "creditd.v1.LedgerService"
# Every replica says, in its own log, that it found the hot store's data gone.
LOSS_LOGGED = re.compile(r"the hot store lost")
AGENCIES = {"a1": ("c1", "c2", "c3"), "a2": ("d1", "d2", "d3")}
TOPUP = CREDIT // 4
CALL_TIMEOUT = 30.0  # longer than any wait of the server: a call that hangs shows as DEADLINE_EXCEEDED
WORKERS = 4  # concurrent callers of each kind on each replica


@dataclass
class Outcomes:
    """What every call of a kind was answered, and when (monotonic)."""

    codes: dict[str, Counter[str]] = field(default_factory=dict)
    not_found: list[tuple[str, str, float]] = field(default_factory=list)

    def note(self, kind: str, code: grpc.StatusCode, detail: str = "") -> None:
        self.codes.setdefault(kind, Counter())[code.name] += 1
        if code is grpc.StatusCode.NOT_FOUND:
            self.not_found.append((kind, detail, time.monotonic()))


class Replica:
    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.env = env
        self.serve = Serve(env, log)
        self.channel: Any = None
        self.api: Api
        self.health: Any = None
        self.readiness: list[tuple[float, int]] = []  # (monotonic time, status) on every change
        self.topups: dict[str, str] = {}  # idempotency key -> the code it was answered
        self.topup_times: list[tuple[float, str]] = []  # (monotonic time of the answer, code)
        self.outcomes = Outcomes()
        self.log_offset = 0

    async def __aenter__(self) -> Replica:
        self.channel = open_channel(self.serve.address)
        await self.channel.__aenter__()
        self.api = Api(self.channel, ADMIN_TOKEN)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.__aexit__(*exc)

    async def status(self) -> int:
        reply = await self.health.Check(health_pb2.HealthCheckRequest(service=READINESS), timeout=2)
        return int(reply.status)

    async def watch_readiness(self, stop: asyncio.Event) -> None:
        """Poll readiness as often as the replica answers, noting every change."""
        while not stop.is_set():
            try:
                status = await self.status()
            except grpc.aio.AioRpcError:
                status = -1
            if not self.readiness or self.readiness[-1][1] != status:
                self.readiness.append((time.monotonic(), status))
            await asyncio.sleep(0.005)

    def went_not_serving_after(self, moment: float) -> bool:
        return any(status == NOT_SERVING for t, status in self.readiness if t >= moment)

    def answered_since(self, moment: float) -> bool:
        """Whether a top-up of this replica was answered OK after `moment`."""
        return any(t >= moment and code == "OK" for t, code in self.topup_times)

    def loss_logged(self) -> bool:
        return bool(LOSS_LOGGED.search(self.serve.output()[self.log_offset :]))

    # -- the load ------------------------------------------------------------------------

    async def run_topups(self, account_id: str, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            key = f"{self.name}-{account_id}-{n}"
            n += 1
            try:
                await self.api.ledger.Topup(
                    ledger_pb2.TopupRequest(
                        account_id=account_id,
                        balance_type=common_pb2.BALANCE_TYPE_VOICE,
                        amount_micros=TOPUP,
                        kind=ledger_pb2.TOPUP_KIND_PURCHASE,
                        idempotency_key=key,
                    ),
                    metadata=self.api.metadata,
                    timeout=CALL_TIMEOUT,
                )
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            self.topups[key] = code.name
            self.topup_times.append((time.monotonic(), code.name))
            self.outcomes.note("Topup", code, key)
            await asyncio.sleep(0.005)

    async def run_balances(self, account_ids: tuple[str, ...], stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            account_id = account_ids[n % len(account_ids)]
            n += 1
            try:
                request = ledger_pb2.GetBalanceRequest(account_id=account_id)
                await self.api.ledger.GetBalance(request, metadata=self.api.metadata, timeout=CALL_TIMEOUT)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            self.outcomes.note("GetBalance", code, account_id)
            await asyncio.sleep(0.002)

    async def run_authorizations(self, worker: int, client_ids: tuple[str, ...], stop: asyncio.Event) -> None:
        """Authorize a new session of an existing client; when allowed, answer and end it at once."""
        n = 0
        while not stop.is_set():
            client_id = client_ids[n % len(client_ids)]
            session_id = f"{self.name}-w{worker}-{n}"
            n += 1
            try:
                answer = await asyncio.wait_for(self.api.authorize(session_id, client_id), CALL_TIMEOUT)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                answer, code = None, exc.code()
            self.outcomes.note("Authorize", code, client_id)
            if answer is not None and answer.allowed:
                await self._release(session_id, client_id)
            await asyncio.sleep(0.002)

    async def _release(self, session_id: str, client_id: str) -> None:
        call = None
        try:
            call, _ = await asyncio.wait_for(self.api.start_call(session_id, client_id), CALL_TIMEOUT)
            await asyncio.wait_for(self.api.end_call(call, 0), CALL_TIMEOUT)
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        finally:
            if call is not None:
                call.cancel()
        self.outcomes.note("StreamUsage", code, session_id)


async def _until(
    predicate: Callable[[], bool | Awaitable[bool]], within: float, what: str, report: Callable[[], str] = str
) -> float:
    """Poll `predicate` until it holds; seconds it took."""
    started = time.monotonic()
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - started
        assert time.monotonic() - started < within, f"timed out after {within}s waiting for {what}\n{report()}"
        await asyncio.sleep(0.02)


def _report(replicas: list[Replica], lost_at: float, logs: bool = True) -> str:
    lines = []
    for r in replicas:
        readiness = [(round(t - lost_at, 3), s) for t, s in r.readiness if t >= lost_at - 0.1]
        codes = {kind: dict(codes) for kind, codes in r.outcomes.codes.items()}
        lines.append(f"{r.name}: readiness (seconds after the loss, status) {readiness}; answers {codes}")
        if logs:
            lines.append(f"{r.name} log since the loss:\n{r.serve.output()[r.log_offset :][-4000:]}")
    return "\n".join(lines)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _setup(api: Api) -> None:
    for agency_id, clients in AGENCIES.items():
        await api.agency(agency_id)
        await api.plan(agency_id, "p", free_voice_micros=100 * CREDIT)
        await api.topup(agency_id, 1000 * CREDIT, f"setup-{agency_id}")
        for client_id in clients:
            await api.client(client_id, agency_id, "p")


def _lose(scenario: str, server: RedisServer) -> None:
    if scenario == "flushall":
        client = server.client()
        try:
            client.flushall()
        finally:
            client.close()
    else:
        server.kill()
        server.start()  # the same port, nothing in it


def _rebuilt(server: RedisServer) -> bool:
    client = server.client()
    try:
        return bool(client.exists("creditd:loaded"))
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.mark.parametrize("scenario", ["flushall", "restart"])
async def test_redis_lost_under_two_replicas(
    scenario: str, private_redis: RedisServer, shared_stores: Stores, tmp_path: Path
) -> None:
    started = time.monotonic()
    envs = [
        creditd_env(
            shared_stores.database_url, private_redis.url, "creditd:", CREDITD_LISTEN=f"127.0.0.1:{free_port()}", **FAST
        )
        for _ in range(2)
    ]
    replicas: list[Replica] = []
    try:
        for i, env in enumerate(envs):
            replicas.append(Replica(f"r{i + 1}", env, tmp_path / f"serve-{i + 1}.log"))
        async with contextlib.AsyncExitStack() as stack:
            for replica in replicas:
                await stack.enter_async_context(replica)
            await _setup(replicas[0].api)
            clients = tuple(c for cs in AGENCIES.values() for c in cs)
            # live calls on both replicas, opened before the loss
            live = [LiveCall(r.api, f"live-{r.name}-{c}", c) for r in replicas for c in ("c1", "d1")]
            await asyncio.gather(*(call.open() for call in live))

            stop, stop_watch = asyncio.Event(), asyncio.Event()
            tasks = [asyncio.create_task(r.watch_readiness(stop_watch)) for r in replicas]
            stack.push_async_callback(_cancel, tasks)
            for r in replicas:
                tasks += [asyncio.create_task(r.run_topups(a, stop)) for a in ("c2", "c3", "d2", "d3")]
                tasks += [asyncio.create_task(r.run_balances(clients, stop)) for _ in range(WORKERS)]
                tasks += [asyncio.create_task(r.run_authorizations(w, clients, stop)) for w in range(WORKERS)]
            await _until(
                lambda: all(r.outcomes.codes.get("Topup", Counter())["OK"] >= 5 for r in replicas), 15, "top-ups"
            )
            for r in replicas:
                assert r.readiness and r.readiness[-1][1] == SERVING, (r.name, r.readiness)
                r.log_offset = len(r.serve.output())

            lost_at = time.monotonic()
            await asyncio.to_thread(_lose, scenario, private_redis)

            def report() -> str:
                return _report(replicas, lost_at)

            # Both replicas notice by themselves, one rebuilds, both serve again.
            await _until(lambda: asyncio.to_thread(_rebuilt, private_redis), 20, "the rebuild", report)
            rebuilt = time.monotonic() - lost_at
            await _until(
                lambda: all(r.readiness[-1][1] == SERVING and r.answered_since(lost_at + rebuilt) for r in replicas),
                20,
                "both replicas serving top-ups again",
                report,
            )
            recovered = time.monotonic() - lost_at
            with contextlib.suppress(AssertionError):  # what a replica logs may come a little later
                await _until(lambda: all(r.loss_logged() for r in replicas), 5, "the loss in both logs")
            stop.set()
            await asyncio.gather(*tasks[2:])
            for call in live:
                await call.end()
            stop_watch.set()
            await asyncio.gather(*tasks[:2])
            ready = {r.name: await r.status() for r in replicas}

            # No retry of anything: the committed top-ups are in Redis whoever answered them.
            committed = Ledger(shared_stores.database_url).topup_keys()
            reconciled = reconcile(envs[0])

        print("\n" + _report(replicas, lost_at, logs=False))
        problems = []
        # Never NOT_FOUND for what exists.
        not_found = [(kind, what, round(t - lost_at, 3)) for r in replicas for kind, what, t in r.outcomes.not_found]
        if not_found:
            problems.append(f"NOT_FOUND for existing accounts (kind, what, seconds after the loss): {not_found}")
        for call in live:
            if call.final is None and (call.error is None or call.error.code() is grpc.StatusCode.NOT_FOUND):
                problems.append(f"live call {call.session_id} ended without a final message: {call.error}")
        # A committed top-up is answered OK or UNAVAILABLE; an OK one is committed, once.
        answered = {key: code for r in replicas for key, code in r.topups.items()}
        wrong = {key: answered.get(key, "never answered") for key in committed if not key.startswith("setup-")}
        wrong = {key: code for key, code in wrong.items() if code not in ("OK", "UNAVAILABLE")}
        if wrong:
            problems.append(f"committed top-ups answered with another error: {wrong}")
        lost_acked = [key for key, code in answered.items() if code == "OK" and committed[key] != 1]
        if lost_acked:
            problems.append(f"top-ups answered OK but not committed once: {lost_acked}")
        output = reconciled.stdout + reconciled.stderr
        if reconciled.returncode != 0 or not re.search(r"\b0 differences", reconciled.stdout):
            problems.append(f"creditd reconcile (no client retried anything) exit {reconciled.returncode}:\n{output}")
        for r in replicas:
            if not r.went_not_serving_after(lost_at):
                problems.append(f"{r.name} stayed SERVING through the loss and the rebuild")
            if ready[r.name] != SERVING:
                problems.append(f"{r.name} is not SERVING after the rebuild")
            if not r.loss_logged():
                problems.append(f"{r.name} logged nothing about the loss")
        unavailable_committed = [key for key in committed if answered.get(key) == "UNAVAILABLE"]
        print(
            f"{scenario}: rebuilt {rebuilt:.2f}s, both replicas serving again {recovered:.2f}s after the loss;"
            f" {len(committed)} top-ups committed, {len(unavailable_committed)} of them answered UNAVAILABLE;"
            f" test ran {time.monotonic() - started:.1f}s"
        )
        assert not problems, "\n".join([*problems, _report(replicas, lost_at)])
        for r in replicas:
            assert r.serve.stop() == 0, r.serve.output()[-3000:]
    finally:
        for r in replicas:
            r.serve.kill()
