"""The Redis of a running `creditd serve` dies and comes back empty during live calls, short
calls and top-ups. The server notices by itself (health monitor: store lost), one replica
rebuilds Redis from Postgres, new calls work again without restarting creditd, and what
was lost is within the measured write-behind lag: no top-up, and only usage acknowledged
in the last flush interval before the crash."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path

import grpc
import psycopg
from creditd_client.v1 import common_pb2

from tests.conftest import CREDIT, Api
from tests.crash.conftest import FAST, Stores
from tests.crash.procs import (
    ADMIN_TOKEN,
    Ledger,
    RedisServer,
    Serve,
    assert_reconciled,
    conninfo,
    creditd_env,
    free_port,
    open_channel,
)
from tests.crash.workload import LiveCall, Topups

FLUSH_INTERVAL = float(FAST["CREDITD_FLUSH_INTERVAL_SECONDS"])
PROBE_INTERVAL = 0.02


class LagProbe:
    """Notes when each ledger entry becomes visible in Postgres (monotonic time)."""

    def __init__(self, database_url: str) -> None:
        self.conninfo = conninfo(database_url)
        self.usage_seen: dict[str, float] = {}  # session id -> first seen
        self.topup_seen: dict[str, float] = {}  # idempotency key -> first seen

    async def run(self, stop: asyncio.Event) -> None:
        last = 0
        async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True) as conn:
            while not stop.is_set():
                with contextlib.suppress(psycopg.Error):
                    cursor = await conn.execute(
                        "SELECT seq, kind, session_id, idempotency_key FROM ledger_entries WHERE seq > %s ORDER BY seq",
                        (last,),
                    )
                    now = time.monotonic()
                    for seq, kind, session_id, key in await cursor.fetchall():
                        last = max(last, seq)
                        if kind == 2:
                            self.usage_seen.setdefault(session_id, now)
                        elif kind == 1:
                            self.topup_seen.setdefault(key, now)
                await asyncio.sleep(PROBE_INTERVAL)


class ShortCalls:
    """Calls that last one second on paper: Authorize, SessionStart, SessionEnd(1)."""

    def __init__(self, api: Api, client_id: str) -> None:
        self.api = api
        self.client_id = client_id
        self.acked: dict[str, float] = {}  # session id -> monotonic time of its summary
        self.errors: Counter[str] = Counter()
        self.count = 0

    async def one(self) -> None:
        session_id = f"short-{self.count}"
        self.count += 1
        try:
            answer = await self.api.authorize(session_id, self.client_id)
            if not answer.allowed:
                self.errors[f"denied {answer.deny_reason}"] += 1
                return
            call, _ = await self.api.start_call(session_id, self.client_id)
            final = await self.api.end_call(call, 1)
        except grpc.aio.AioRpcError as exc:
            self.errors[exc.code().name] += 1
            return
        if final.WhichOneof("msg") == "summary":
            self.acked[session_id] = time.monotonic()
        else:
            self.errors[f"cutoff {final.cutoff.reason}"] += 1

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.one(), 5)
            await asyncio.sleep(0.01)


async def _authorize_code(api: Api, session_id: str) -> grpc.StatusCode:
    try:
        answer = await api.authorize(session_id, "c4")
        assert answer.allowed, answer
        call, _ = await api.start_call(session_id, "c4")  # and release it at once
        final = await api.end_call(call, 0)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    assert final.WhichOneof("msg") == "summary", final
    return grpc.StatusCode.OK


async def test_redis_restarted_empty_during_calls(
    private_redis: RedisServer, shared_stores: Stores, tmp_path: Path
) -> None:
    env = creditd_env(
        shared_stores.database_url, private_redis.url, "creditd:", CREDITD_LISTEN=f"127.0.0.1:{free_port()}", **FAST
    )
    server = Serve(env, tmp_path / "serve.log")
    ledger = Ledger(shared_stores.database_url)
    try:
        async with open_channel(server.address) as channel:
            api = Api(channel, ADMIN_TOKEN)
            await api.agency("a1")
            await api.plan("a1", "p", free_voice_micros=100 * CREDIT)
            for client in ("c1", "c2", "c3", "c4"):
                await api.client(client, "a1", "p")
            live = [LiveCall(api, f"live-{i}", "c1") for i in range(4)]
            await asyncio.gather(*(call.open() for call in live))
            stop, stop_probe = asyncio.Event(), asyncio.Event()
            probe = LagProbe(shared_stores.database_url)
            short = ShortCalls(api, "c2")
            topups = Topups(api, "c3", CREDIT // 4, "pay")
            tasks = [
                asyncio.create_task(probe.run(stop_probe)),
                asyncio.create_task(short.run(stop)),
                asyncio.create_task(topups.run(stop)),
            ]
            await asyncio.sleep(3.0)

            private_redis.kill()
            killed = time.monotonic()
            # fail closed while Redis is away: new sessions get UNAVAILABLE
            assert await _authorize_code(api, "during-outage") == grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(1.5)
            private_redis.start()  # the same port, nothing in it
            restarted = time.monotonic()

            # creditd notices by itself, rebuilds, and serves again
            deadline = time.monotonic() + 15
            attempt = 0
            while (code := await _authorize_code(api, f"probe-{attempt}")) != grpc.StatusCode.OK:
                assert code == grpc.StatusCode.UNAVAILABLE, code
                assert time.monotonic() < deadline, "creditd never served again after Redis came back"
                attempt += 1
                await asyncio.sleep(0.1)
            recovered = time.monotonic() - restarted
            await asyncio.sleep(1.0)  # some more short calls and top-ups on the rebuilt store
            stop.set()
            await asyncio.gather(*tasks[1:])
            await asyncio.sleep(2 * FLUSH_INTERVAL + 0.3)  # let the last records reach Postgres
            stop_probe.set()
            await tasks[0]

            # the live calls lost with Redis end, settled once, by the rebuild or the run
            for call in live:
                await call.wait(10)
                assert call.final is not None, (call.session_id, call.error)
                assert call.final.WhichOneof("msg") == "cutoff", call.final
            assert short.acked and topups.acked
            unanswered = list(topups.failed)
            await topups.retry_failed()
            # a new call after the rebuild runs normally
            fresh = LiveCall(api, "after-rebuild", "c3")
            await fresh.open()
            await asyncio.sleep(1.1)
            await fresh.end()
            assert fresh.final is not None and fresh.final.WhichOneof("msg") == "summary", fresh.final
            balances = {a: await api.balance(a) for a in ("a1", "c1", "c2", "c3")}
        assert server.stop() == 0
        output = server.output()
        assert output.count("hot store rebuilt from the database") == 1, output

        # the write-behind lag, as measured from outside (summary received -> row visible)
        before = {s: t for s, t in short.acked.items() if t < killed}
        lags = sorted(probe.usage_seen[s] - t for s, t in before.items() if s in probe.usage_seen)
        assert lags, "no usage reached Postgres before the crash"
        max_lag, p50_lag = lags[-1], lags[len(lags) // 2]
        # top-ups: none lost, whatever the timing (they commit to Postgres first)
        keys = ledger.topup_keys()
        assert all(keys[key] == 1 for key in topups.acked), keys
        assert balances["c3"].voice.purchased_micros == len(topups.acked) * (CREDIT // 4)
        # usage: only what was acknowledged within the write-behind lag before the crash
        per_session = Counter(u.session_id for u in ledger.voice_usage() if u.account_id == "c2")
        lost = {s: killed - t for s, t in before.items() if per_session[s] == 0}
        bound = max(max_lag, FLUSH_INTERVAL) + PROBE_INTERVAL + 0.05
        assert all(age <= bound for age in lost.values()), (lost, bound)
        # ...and what survived was settled exactly once
        assert all(count == 1 for count in per_session.values()), per_session
        usage = ledger.voice_usage()
        rebilled = [u for u in usage if u.account_id == "c2" and u.session_id in before and u.seconds != 1]
        for account, balance in balances.items():
            for wallet in (balance.voice, balance.sms):
                assert wallet.free_micros >= 0 and wallet.purchased_micros >= 0, account
                assert wallet.available_micros >= 0 and wallet.reserved_micros == 0, account
        print(
            f"\nredis lost: write-behind lag p50 {p50_lag * 1000:.0f} ms, max {max_lag * 1000:.0f} ms"
            f" over {len(lags)} calls; {len(lost)} of {len(before)} short calls acknowledged before the crash"
            f" lost (acknowledged {max(lost.values(), default=0) * 1000:.0f} ms or less before it), {len(rebilled)}"
            f" settled again at their full grant by the rebuild; {len(topups.acked)} top-ups, none lost"
            f" ({len(unanswered)} unanswered during the outage, retried); back in service {recovered:.2f}s after"
            f" Redis restarted; errors seen by callers: {dict(short.errors)}"
        )
        print(assert_reconciled(env))
        # A short call authorized just before the loss and started after the rebuild finds
        # its session settled by the rebuild: its SessionStart is answered with that end.
        abandoned = f"cutoff {common_pb2.DENY_REASON_SESSION_ABANDONED}"
        assert set(short.errors) <= {"UNAVAILABLE", abandoned}, short.errors
    finally:
        server.kill()
