"""Random interleavings of concurrent calls, SMS and top-ups on one agency (hypothesis).

After every round: no wallet or limit below zero, no call billed past its grant, every
charge exactly the price of what was billed. At the end the ledger sums to the balances.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from creditd_client.v1 import common_pb2, ledger_pb2, metering_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from creditd.domain.money import voice_cost
from tests.conftest import CREDIT, Api, Running

CLIENTS = ("rebill", "paid", "limited")
ACCOUNTS = ("agency", "rebill", "limited")  # the ones with a wallet
counter = itertools.count()

call_op = st.tuples(st.just("call"), st.sampled_from(CLIENTS), st.integers(0, 150))
sms_op = st.tuples(
    st.just("sms"), st.sampled_from(CLIENTS), st.sampled_from(["US", "GB"]), st.integers(1, 3), st.integers(0, 5)
)
topup_op = st.tuples(
    st.just("topup"),
    st.sampled_from(ACCOUNTS),
    st.integers(0, 3),
    st.sampled_from([common_pb2.BALANCE_TYPE_VOICE, common_pb2.BALANCE_TYPE_SMS]),
)
rounds = st.lists(st.lists(st.one_of(call_op, sms_op, topup_op), min_size=1, max_size=6), min_size=1, max_size=5)


async def _setup(api: Api, prefix: str) -> dict[str, str]:
    ids = {name: f"{prefix}-{name}" for name in ("agency", *CLIENTS)}
    await api.agency(ids["agency"], free_voice_micros=2 * CREDIT, free_sms_micros=CREDIT, sms_rates={"GB": 400_000})
    await api.plan(
        ids["agency"], "p", free_voice_micros=CREDIT, free_sms_micros=CREDIT, voice_rates={"elevenlabs": 1_500_000}
    )
    await api.plan(
        ids["agency"], "capped", free_voice_micros=3 * CREDIT, free_sms_micros=CREDIT, usage_limit_micros=1_500_000
    )
    await api.client(ids["rebill"], ids["agency"], "p")
    await api.client(ids["paid"], ids["agency"], "capped", common_pb2.BILLING_MODE_AGENCY_PAID)
    await api.client(ids["limited"], ids["agency"], "capped")
    return ids


async def _call(api: Api, client: str, seconds: int, plan_rate: int) -> None:
    session = f"call-{next(counter)}"
    authorized = await api.authorize(session, client, provider="elevenlabs")
    if not authorized.allowed:
        assert authorized.granted_seconds == 0
        return
    stream, grant = await api.start_call(session, client)
    granted = grant.grant.granted_seconds
    await stream.write(metering_pb2.StreamUsageRequest(end=metering_pb2.SessionEnd(seconds_used=seconds)))
    message = await stream.read()
    while message.WhichOneof("msg") in ("grant", "warning"):  # a renewal may have raced the end
        if message.WhichOneof("msg") == "grant":
            granted = message.grant.granted_seconds
        message = await stream.read()
    assert message.WhichOneof("msg") == "summary"
    summary = message.summary
    assert summary.billed_seconds == min(seconds, granted) <= granted
    assert summary.agency_charged_micros == voice_cost(CREDIT, summary.billed_seconds)
    assert summary.client_charged_micros == voice_cost(plan_rate, summary.billed_seconds)


async def _sms(api: Api, client: str, country: str, segments: int, message: int) -> None:
    stream = api.stream()
    start = metering_pb2.SessionStart(
        session_id=f"sms-{next(counter)}", client_id=client, channel=common_pb2.CHANNEL_SMS
    )
    await stream.write(metering_pb2.StreamUsageRequest(start=start))
    # The id names the parameters, so a repeated id is a retry of the same message.
    message_id = f"{client}-m{message}-{country}-{segments}"
    send = metering_pb2.SmsSend(message_id=message_id, destination_country=country, segments=segments)
    await stream.write(metering_pb2.StreamUsageRequest(sms=send))
    result = (await stream.read()).sms_result
    if result.allowed:
        assert result.charged_micros > 0
    stream.cancel()


async def _topup(api: Api, account: str, key: int, balance_type: int) -> None:
    # The amount follows from the key, so a repeated key is a replay of the same top-up.
    amount = (key + 1) * 300_000 + balance_type
    await api.topup(account, amount, f"{account}-{key}-{balance_type}", balance_type=balance_type)


async def _check_balances(api: Api, ids: dict[str, str]) -> None:
    for name in ("agency", *CLIENTS):
        response = await api.balance(ids[name])
        for balance in (response.voice, response.sms):
            assert balance.free_micros >= 0 and balance.purchased_micros >= 0
            assert balance.reserved_micros >= 0 and balance.available_micros >= 0
            if balance.usage_limit_micros:
                assert balance.period_used_micros + balance.reserved_micros <= balance.usage_limit_micros


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(plan=rounds)
async def test_random_interleavings_never_overspend_and_the_ledger_adds_up(
    server: Running, plan: list[list[tuple[Any, ...]]]
) -> None:
    api = server.api
    ids = await _setup(api, f"x{next(counter)}")
    for round_ in plan:
        tasks = []
        for op in round_:
            if op[0] == "call":
                rate = 1_500_000 if op[1] == "rebill" else CREDIT
                tasks.append(_call(api, ids[op[1]], op[2], rate))
            elif op[0] == "sms":
                tasks.append(_sms(api, ids[op[1]], *op[2:]))
            else:
                tasks.append(_topup(api, ids[op[1]], *op[2:]))
        await asyncio.gather(*tasks)
        await _check_balances(api, ids)

    await server.app.flusher.flush()
    for name in ("agency", *CLIENTS):
        response = await api.balance(ids[name])
        entries = (
            await api.ledger.ListLedgerEntries(
                ledger_pb2.ListLedgerEntriesRequest(account_id=ids[name], page_size=1000), metadata=api.metadata
            )
        ).entries
        for balance_type, balance in (
            (common_pb2.BALANCE_TYPE_VOICE, response.voice),
            (common_pb2.BALANCE_TYPE_SMS, response.sms),
        ):
            mine = [e for e in entries if e.balance_type == balance_type]
            assert sum(e.free_micros for e in mine) == balance.free_micros
            assert sum(e.purchased_micros for e in mine) == balance.purchased_micros
            assert sum(e.usage_micros for e in mine) == balance.period_used_micros
            assert balance.reserved_micros == 0
