"""`creditd serve` (Redis + Postgres) killed with SIGKILL during live calls and top-ups, then
restarted: nothing acknowledged is lost, every live call is settled exactly once (by the
lease sweeper, since Redis kept them), no wallet goes below zero, reconcile is clean."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import grpc
from creditd_client.v1 import common_pb2

from tests.conftest import CREDIT, Api
from tests.crash.conftest import FAST, Stores
from tests.crash.procs import ADMIN_TOKEN, Ledger, Serve, assert_reconciled, creditd_env, free_port, open_channel
from tests.crash.workload import LiveCall, Topups, resume

CLIENTS = ("c1", "c2", "c3")


async def _setup(api: Api) -> None:
    await api.agency("a1")
    await api.plan("a1", "p", free_voice_micros=100 * CREDIT)
    for client in CLIENTS:
        await api.client(client, "a1", "p")


async def _settled(api: Api, session_id: str, client_id: str, within: float) -> tuple[int, int, float]:
    """Resume the session until the server answers with its final message; returns
    (cutoff reason, billed seconds, when)."""
    deadline = time.monotonic() + within
    while True:
        try:
            message = await resume(api, session_id, client_id)
        except grpc.aio.AioRpcError as exc:
            # still leased to the dead process: "the session is live on another server"
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
            assert time.monotonic() < deadline, f"{session_id} was never settled"
            await asyncio.sleep(0.25)
            continue
        assert message.WhichOneof("msg") == "cutoff", message
        return message.cutoff.reason, message.cutoff.billed_seconds, time.monotonic()


async def test_sidecar_killed_during_calls_and_topups(shared_stores: Stores, tmp_path: Path) -> None:
    env = creditd_env(
        shared_stores.database_url,
        shared_stores.redis_url,
        shared_stores.prefix,
        CREDITD_LISTEN=f"127.0.0.1:{free_port()}",
        **FAST,
    )
    log = tmp_path / "serve.log"
    server = Serve(env, log)
    try:
        async with open_channel(server.address) as channel:
            api = Api(channel, ADMIN_TOKEN)
            await _setup(api)
            calls = [LiveCall(api, f"live-{i}", CLIENTS[i % 3]) for i in range(6)]
            await asyncio.gather(*(call.open() for call in calls))
            topups = Topups(api, "c1", CREDIT // 4, "pay")
            stop = asyncio.Event()
            paying = asyncio.create_task(topups.run(stop, pause=0.005))
            await asyncio.sleep(2.6)  # every call renews its 3 s slice at least once
            assert all(len(call.grants) >= 2 for call in calls), [call.grants for call in calls]
            assert topups.acked
            server.kill()  # mid-flight: top-ups, renewals and reports all pending
            await asyncio.sleep(0.3)
            stop.set()
            await paying
            for call in calls:
                await call.wait(5)
                assert call.final is None and call.error is not None
                assert call.error.code() == grpc.StatusCode.UNAVAILABLE
                call.cancel()
        last_grant = {call.session_id: call.granted for call in calls}
        acked = dict(topups.acked)
        ledger = Ledger(shared_stores.database_url)
        unanswered = list(topups.failed)
        unanswered_but_committed = [key for key in unanswered if ledger.topup_keys()[key]]

        restarted = time.monotonic()
        server = Serve(env, log)
        async with open_channel(server.address) as channel:
            api = Api(channel, ADMIN_TOKEN)
            topups.api = api
            await topups.retry_failed()  # the payment side retries what it got no answer for

            # Redis kept the sessions: nobody serves them, and the sweeper settles each one
            # at everything it was granted once its lease (2 slices + grace = 8 s) runs out.
            billed = {}
            settled_after = 0.0
            for call in calls:
                reason, seconds, when = await _settled(api, call.session_id, call.client_id, within=30)
                assert reason == common_pb2.DENY_REASON_SESSION_ABANDONED
                billed[call.session_id] = seconds
                settled_after = max(settled_after, when - restarted)
                assert settled_after < 20, settled_after
            for call in calls:
                # billed what was reserved: at least the last grant the caller saw, at most
                # one renewal more (granted, but the Grant died with the process)
                assert last_grant[call.session_id] <= billed[call.session_id] <= last_grant[call.session_id] + 3

            # the restarted server serves new calls
            fresh = LiveCall(api, "after-restart", "c2")
            await fresh.open()
            await asyncio.sleep(1.1)
            await fresh.end()
            assert fresh.final is not None and fresh.final.WhichOneof("msg") == "summary", fresh.final

            balances = {a: await api.balance(a) for a in ("a1", *CLIENTS)}
        assert server.stop() == 0

        # Postgres: every acknowledged top-up once, every session settled once
        keys = ledger.topup_keys()
        for key in acked:
            assert keys[key] == 1, key
        assert {k for k in keys if k.startswith("pay-")} == set(topups.acked)
        sessions = ledger.sessions()
        per_payer = Counter((u.session_id, u.account_id) for u in ledger.voice_usage())
        for call in calls:
            status, granted, billed_seconds, _ = sessions[call.session_id]
            assert status == "settled"
            assert billed_seconds == granted == billed[call.session_id]
            assert per_payer[(call.session_id, call.client_id)] == 1
            assert per_payer[(call.session_id, "a1")] == 1
        assert all(count == 1 for count in per_payer.values()), per_payer
        c1 = balances["c1"].voice
        assert c1.purchased_micros == len(topups.acked) * (CREDIT // 4)
        for account, balance in balances.items():
            for wallet in (balance.voice, balance.sms):
                assert wallet.free_micros >= 0 and wallet.purchased_micros >= 0, account
                assert wallet.available_micros >= 0 and wallet.reserved_micros == 0, account
        totals = ledger.balances()
        assert all(free >= 0 and purchased >= 0 for free, purchased in totals.values()), totals
        print(
            f"\nsidecar kill: {len(acked)} top-ups acknowledged before the kill, {len(unanswered)} unanswered"
            f" ({len(unanswered_but_committed)} of them committed before the kill), sessions settled by the"
            f" sweeper {settled_after:.1f}s after the restart"
        )
        print(assert_reconciled(env))
    finally:
        server.kill()
