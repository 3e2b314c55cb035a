"""`creditd serve` (Redis + Postgres) killed with SIGKILL during live calls and top-ups, then
restarted: nothing acknowledged is lost, the calls whose workers come back within the grace
period go on where they were, the others are settled exactly once at what they were granted
(by the sweeper, since Redis kept them), no wallet goes below zero, reconcile is clean."""

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
from tests.crash.workload import LiveCall, Topups

CLIENTS = ("c1", "c2", "c3")
GRACE = 8  # long enough for a restart on a busy machine: the resumed calls must make it


async def _setup(api: Api) -> None:
    await api.agency("a1")
    await api.plan("a1", "p", free_voice_micros=100 * CREDIT)
    for client in CLIENTS:
        await api.client(client, "a1", "p")


async def _abandoned(ledger: Ledger, session_ids: list[str], within: float) -> dict[str, tuple[int, int]]:
    """Wait until the database has every session settled; session id -> (billed seconds, reason)."""
    deadline = time.monotonic() + within
    while True:
        sessions = ledger.sessions()
        settled = {s: sessions[s] for s in session_ids if s in sessions and sessions[s][0] == "settled"}
        if len(settled) == len(session_ids):
            return {s: (billed, reason) for s, (_, _, billed, reason) in settled.items()}
        assert time.monotonic() < deadline, f"never settled: {set(session_ids) - set(settled)}"
        await asyncio.sleep(0.25)


async def test_sidecar_killed_during_calls_and_topups(shared_stores: Stores, tmp_path: Path) -> None:
    env = creditd_env(
        shared_stores.database_url,
        shared_stores.redis_url,
        shared_stores.prefix,
        CREDITD_LISTEN=f"127.0.0.1:{free_port()}",
        **{**FAST, "CREDITD_GRACE_SECONDS": str(GRACE)},
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
            killed = time.monotonic()
            await asyncio.sleep(0.3)
            stop.set()
            await paying
            for call in calls:
                await call.wait(5)
                assert call.final is None and call.error is not None
                assert call.error.code() == grpc.StatusCode.UNAVAILABLE
        resuming, gone = calls[:3], calls[3:]  # the workers of `gone` never come back
        last_grant = {call.session_id: call.granted for call in calls}
        acked = dict(topups.acked)
        ledger = Ledger(shared_stores.database_url)
        unanswered = list(topups.failed)
        unanswered_but_committed = [key for key in unanswered if ledger.topup_keys()[key]]

        server = Serve(env, log)
        async with open_channel(server.address) as channel:
            api = Api(channel, ADMIN_TOKEN)
            topups.api = api
            await topups.retry_failed()  # the payment side retries what it got no answer for

            # Workers that reconnect within the grace period carry on: their session is
            # taken over from Redis with the grant it had, and renews again.
            assert time.monotonic() - killed < GRACE
            for call in resuming:
                await call.resume(api)
                assert call.error is None and call.final is None, call.final
                assert call.granted >= last_grant[call.session_id]
            renewed_at = time.monotonic() + 15
            while not all(call.granted > last_grant[call.session_id] for call in resuming):
                assert time.monotonic() < renewed_at, [call.grants for call in resuming]
                await asyncio.sleep(0.1)
            reported = {call.session_id: await call.end() for call in resuming}
            for call in resuming:
                assert call.final is not None and call.final.WhichOneof("msg") == "summary", call.final
                assert call.final.summary.billed_seconds == reported[call.session_id]

            # The others: nobody serves them, and the sweeper settles each one at everything
            # it was granted once the grace period after its last grant runs out.
            settled = await _abandoned(ledger, [call.session_id for call in gone], within=40)
            billed = {session_id: seconds for session_id, (seconds, _) in settled.items()}
            billed.update({call.session_id: call.final.summary.billed_seconds for call in resuming if call.final})
            for call in gone:
                seconds, reason = settled[call.session_id]
                assert reason == common_pb2.DENY_REASON_SESSION_ABANDONED
                # billed what was reserved: at least the last grant the caller saw, at most
                # one renewal more (granted, but the Grant died with the process)
                assert last_grant[call.session_id] <= seconds <= last_grant[call.session_id] + 3

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
            assert billed_seconds == billed[call.session_id] <= granted
            if call in gone:
                assert billed_seconds == granted
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
            f" ({len(unanswered_but_committed)} of them committed before the kill), {len(resuming)} calls"
            f" resumed, {len(gone)} settled as abandoned"
        )
        print(assert_reconciled(env))
    finally:
        server.kill()
