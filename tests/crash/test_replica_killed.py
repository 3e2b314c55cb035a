"""Two `creditd serve` replicas on one Redis and one Postgres, calls spread over both the way
a load balancer spreads them (authorized on either, streamed on the other). The replica that
serves all 20 live calls is killed with SIGKILL: their workers resume on the other and every
call goes on to its natural end; once it is back, calls move to it too. Each call is billed
once, what its worker reported, nothing overspent."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import grpc

from tests.conftest import CREDIT, Api
from tests.crash.conftest import FAST, Stores
from tests.crash.procs import ADMIN_TOKEN, Ledger, Serve, assert_reconciled, creditd_env, free_port, open_channel
from tests.crash.workload import LiveCall

CLIENTS = ("c1", "c2")


async def _renewed(calls: list[LiveCall], beyond: dict[str, int], within: float = 15) -> None:
    """Wait until every call was granted more than `beyond` (it renews where it now streams)."""
    deadline = time.monotonic() + within
    while not all(call.granted > beyond[call.session_id] for call in calls):
        assert time.monotonic() < deadline, [(call.session_id, call.grants, call.error) for call in calls]
        await asyncio.sleep(0.1)


async def test_a_killed_replica_loses_no_call(shared_stores: Stores, tmp_path: Path) -> None:
    def env() -> dict[str, str]:
        return creditd_env(
            shared_stores.database_url,
            shared_stores.redis_url,
            shared_stores.prefix,
            CREDITD_LISTEN=f"127.0.0.1:{free_port()}",
            **{**FAST, "CREDITD_GRACE_SECONDS": "8"},
        )

    env_a, env_b = env(), env()
    a, b = Serve(env_a, tmp_path / "a.log"), Serve(env_b, tmp_path / "b.log")
    try:
        async with open_channel(a.address) as channel_a, open_channel(b.address) as channel_b:
            api_a, api_b = Api(channel_a, ADMIN_TOKEN), Api(channel_b, ADMIN_TOKEN)
            await api_a.agency("a1")
            await api_a.plan("a1", "p", free_voice_micros=100 * CREDIT)
            for client in CLIENTS:
                await api_a.client(client, "a1", "p")
            # all 20 calls stream on A; half of them were authorized on B
            calls = [LiveCall(api_b if i % 2 else api_a, f"call-{i}", CLIENTS[i % 2]) for i in range(20)]
            await asyncio.gather(*(call.open(api_a) for call in calls))
            await _renewed(calls, {call.session_id: 3 for call in calls})

            a.kill()
            for call in calls:
                await call.wait(5)
                assert call.error is not None and call.error.code() == grpc.StatusCode.UNAVAILABLE
            before = {call.session_id: call.granted for call in calls}
            for call in calls:
                await call.resume(api_b)
                assert call.error is None and call.final is None, call.final
                assert call.granted >= before[call.session_id]
            await _renewed(calls, before)  # B renews every call it took over

            a = Serve(env_a, tmp_path / "a.log")
            async with open_channel(a.address) as channel_a:
                api_a = Api(channel_a, ADMIN_TOKEN)
                moved = calls[::4]  # some calls move back to the restarted replica
                before = {call.session_id: call.granted for call in calls}
                for call in moved:
                    await call.resume(api_a)
                    assert call.error is None and call.final is None, call.final
                await _renewed(calls, before)
                reported = {call.session_id: await call.end() for call in calls}
                for call in calls:
                    assert call.final is not None and call.final.WhichOneof("msg") == "summary", call.final
                    assert call.final.summary.billed_seconds == reported[call.session_id]
                balances = [await api_b.balance(account) for account in ("a1", *CLIENTS)]
        assert a.stop() == 0 and b.stop() == 0

        ledger = Ledger(shared_stores.database_url)
        sessions = ledger.sessions()
        per_payer = Counter((u.session_id, u.account_id) for u in ledger.voice_usage())
        for call in calls:
            status, granted, billed, _ = sessions[call.session_id]
            assert status == "settled" and billed == reported[call.session_id] <= granted
            assert per_payer[(call.session_id, call.client_id)] == 1 and per_payer[(call.session_id, "a1")] == 1
        assert all(count == 1 for count in per_payer.values()), per_payer
        for balance in balances:
            assert balance.voice.reserved_micros == 0
        print(assert_reconciled(env_b))
    finally:
        a.kill()
        b.kill()
