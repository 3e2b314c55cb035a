"""The Postgres of a running `creditd serve` stops for a few seconds during calls and top-ups.

While it is down, Topup and Authorize fail closed (UNAVAILABLE), live calls keep renewing
within the allowed unrecorded window, and when it returns creditd resumes by itself, the
write-behind outbox drains, and reconcile is clean."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import grpc
import redis.asyncio

from tests.conftest import CREDIT, Api
from tests.crash.conftest import FAST
from tests.crash.procs import (
    ADMIN_TOKEN,
    Ledger,
    PostgresCluster,
    Serve,
    assert_reconciled,
    creditd_env,
    free_port,
    open_channel,
)
from tests.crash.workload import LiveCall, Topups
from tests.services import REDIS_URL, delete_redis_keys, new_redis_prefix

DOWN_SECONDS = 4.0


async def _authorize(api: Api, session_id: str) -> grpc.StatusCode:
    """Authorize, and release the session at once; the status code it got."""
    try:
        answer = await api.authorize(session_id, "c2")
        assert answer.allowed, answer
        call, _ = await api.start_call(session_id, "c2")
        final = await api.end_call(call, 1)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    assert final.WhichOneof("msg") == "summary", final
    return grpc.StatusCode.OK


async def _until(api: Api, want: grpc.StatusCode, within: float, name: str) -> float:
    """Try Authorize until it answers `want`; returns how long that took."""
    started = time.monotonic()
    attempt = 0
    while (code := await _authorize(api, f"{name}-{attempt}")) != want:
        assert time.monotonic() - started < within, f"Authorize still answers {code}, not {want}"
        attempt += 1
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def _outbox_drained(prefix: str, within: float) -> float:
    """Wait until every outbox stream under `prefix` is empty; returns how long it took."""
    client = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
    started = time.monotonic()
    try:
        while True:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*outbox")]
            pending = sum([await client.xlen(key) for key in keys])
            if not pending:
                return time.monotonic() - started
            assert time.monotonic() - started < within, f"{pending} records still in the outbox"
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()


async def test_postgres_stopped_during_calls(
    private_postgres: PostgresCluster, private_postgres_database: str, tmp_path: Path
) -> None:
    prefix = new_redis_prefix()
    env = creditd_env(private_postgres_database, REDIS_URL, prefix, CREDITD_LISTEN=f"127.0.0.1:{free_port()}", **FAST)
    server = Serve(env, tmp_path / "serve.log")
    ledger = Ledger(private_postgres_database)
    try:
        async with open_channel(server.address) as channel:
            api = Api(channel, ADMIN_TOKEN)
            await api.agency("a1")
            await api.plan("a1", "p", free_voice_micros=100 * CREDIT)
            for client in ("c1", "c2", "c3"):
                await api.client(client, "a1", "p")
            calls = [LiveCall(api, f"live-{i}", "c1") for i in range(4)]
            await asyncio.gather(*(call.open() for call in calls))
            topups = Topups(api, "c3", CREDIT // 4, "pay")
            stop = asyncio.Event()
            paying = asyncio.create_task(topups.run(stop, pause=0.01))
            await asyncio.sleep(1.5)

            private_postgres.stop("immediate")
            stopped = time.monotonic()
            # fail closed: Topup cannot be made durable, so it is refused at once...
            refused = Topups(api, "c3", CREDIT // 4, "refused")
            assert not await refused.one()
            assert refused.failed["refused-0"] == grpc.StatusCode.UNAVAILABLE
            # ...and new sessions are refused once the health monitor has seen it
            await _until(api, grpc.StatusCode.UNAVAILABLE, 5, "down")
            detected = time.monotonic() - stopped
            grants_at_stop = {call.session_id: call.granted for call in calls}
            await asyncio.sleep(max(0.0, DOWN_SECONDS - (time.monotonic() - stopped)))
            # live calls went on renewing: what they use is held in Redis's outbox
            for call in calls:
                assert not call.done, (call.session_id, call.final, call.error)
                assert call.granted > grants_at_stop[call.session_id], call.grants
            failed_while_down = Counter(code.name for code in topups.failed.values())

            private_postgres.start()
            down_for = time.monotonic() - stopped
            recovered = await _until(api, grpc.StatusCode.OK, 15, "back")
            stop.set()
            await paying
            await topups.retry_failed()
            for call in calls:
                assert not call.done, (call.session_id, call.final, call.error)
                await call.end()
                assert call.final is not None and call.final.WhichOneof("msg") == "summary", call.final
            balances = {a: await api.balance(a) for a in ("a1", "c1", "c2", "c3")}
            # the write-behind outbox drains by itself (the stopped server's last flush aside)
            drained_after = await _outbox_drained(prefix, within=5)
        output = server.output()
        assert server.stop() == 0

        # the outbox drained: every call's settlement reached Postgres
        sessions = ledger.sessions()
        per_session = Counter(u.session_id for u in ledger.voice_usage() if u.account_id == "c1")
        for call in calls:
            assert sessions[call.session_id][0] == "settled"
            assert per_session[call.session_id] == 1
            summary = call.final.summary  # type: ignore[union-attr]
            assert sessions[call.session_id][2] == summary.billed_seconds
        keys = ledger.topup_keys()
        assert all(keys[key] == 1 for key in topups.acked)
        assert keys["refused-0"] == 0
        assert balances["c3"].voice.purchased_micros == len(topups.acked) * (CREDIT // 4)
        for account, balance in balances.items():
            for wallet in (balance.voice, balance.sms):
                assert wallet.free_micros >= 0 and wallet.purchased_micros >= 0, account
                assert wallet.available_micros >= 0 and wallet.reserved_micros == 0, account
        assert "database unavailable" in output
        print(
            f"\npostgres down {down_for:.1f}s: Topup refused at once, Authorize refused"
            f" {detected:.2f}s after the stop; live calls renewed throughout; service back"
            f" {recovered:.2f}s after Postgres restarted, outbox empty {drained_after:.2f}s after the calls ended;"
            f" refused top-ups {dict(failed_while_down)}"
        )
        print(assert_reconciled(env))
    finally:
        server.kill()
        delete_redis_keys(prefix)
        if not private_postgres.running():
            private_postgres.start()
