"""The Stripe adapter: webhooks signed with a test secret go through the real `stripe` verification
into a real creditd; outgoing PaymentIntents go to a local stand-in for Stripe's API (stripe_api.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import stripe
from conftest import CREDIT, Setup, unique
from stripe_api import StripeStandIn, signed_event

from creditd_client import aio
from creditd_client.stripe import BillingProfile, StripeAdapter
from creditd_client.types import Event
from creditd_client.v1 import ledger_pb2

SECRET = "whsec_test_creditd"
API_KEY = "sk_test_creditd"


@pytest.fixture
def standin() -> Iterator[StripeStandIn]:
    with StripeStandIn(API_KEY) as running:
        yield running


def adapter_for(client: aio.Client, standin: StripeStandIn, **profiles: BillingProfile) -> StripeAdapter:
    stripe_client = stripe.StripeClient(
        API_KEY, base_addresses={"api": standin.url}, http_client=stripe.HTTPXClient(), max_network_retries=0
    )
    return StripeAdapter(
        client, stripe_client, webhook_secret=SECRET, profiles=profiles, unit_amount_per_credit=12, rescan_seconds=0.5
    )


@pytest.fixture
async def http(client: aio.Client, standin: StripeStandIn) -> AsyncIterator[Callable[..., Awaitable[httpx.Response]]]:
    adapter = adapter_for(client, standin)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=adapter.app), base_url="http://adapter") as web:

        async def post(payload: bytes, headers: dict[str, str]) -> httpx.Response:
            return await web.post("/stripe/webhook", content=payload, headers=headers)

        yield post


def payment(account_id: str, credits: str, intent_id: str = "pi_1", **metadata: str) -> dict[str, Any]:
    return {
        "id": intent_id,
        "object": "payment_intent",
        "amount": 1500,
        "currency": "usd",
        "status": "succeeded",
        "metadata": {"creditd_account_id": account_id, "creditd_credits": credits, **metadata},
    }


async def purchased(client: aio.Client, account_id: str) -> tuple[int, int]:
    balance = await client.get_balance(account_id)
    return balance.voice.purchased_micros, balance.sms.purchased_micros


async def eventually(condition: Callable[[], Any], what: str, deadline: float = 20.0) -> None:
    stop = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > stop:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.05)


async def test_a_signed_payment_is_credited_exactly_once(client: aio.Client, setup: Setup, http: Any) -> None:
    payload, headers = signed_event(SECRET, "evt_1", "payment_intent.succeeded", payment(setup.client_id, "12.5"))
    first = await http(payload, headers)
    assert first.status_code == 200, first.text
    assert await purchased(client, setup.client_id) == (12_500_000, 0)
    again = await http(payload, headers)  # Stripe retries, or someone replays it
    assert again.status_code == 200 and again.json() == first.json()
    payload, headers = signed_event(SECRET, "evt_1", "payment_intent.succeeded", payment(setup.client_id, "12.5"))
    assert (await http(payload, headers)).json() == first.json()  # signed again later: still the same event
    assert await purchased(client, setup.client_id) == (12_500_000, 0)

    sms = payment(setup.client_id, "0.166", "pi_2", creditd_balance_type="sms")
    assert (await http(*signed_event(SECRET, "evt_2", "payment_intent.succeeded", sms))).status_code == 200
    assert await purchased(client, setup.client_id) == (12_500_000, 166_000)
    (entry,) = [e async for e in client.list_ledger_entries(setup.client_id, balance_type="voice")][:1]
    assert (entry.idempotency_key, entry.external_ref, entry.topup_kind) == (
        "stripe:evt_1",
        "pi_1",
        ledger_pb2.TOPUP_KIND_PURCHASE,
    )


async def test_unsigned_bad_and_unknown_events_change_nothing(client: aio.Client, setup: Setup, http: Any) -> None:
    payload, headers = signed_event(SECRET, "evt_1", "payment_intent.succeeded", payment(setup.client_id, "5"))
    unsigned = {"Content-Type": "application/json"}
    assert (await http(payload, unsigned)).status_code == 400
    forged = signed_event("whsec_someone_else", "evt_1", "payment_intent.succeeded", payment(setup.client_id, "5"))
    assert (await http(*forged)).status_code == 400
    assert (await http(payload.replace(b'"5"', b'"500"'), headers)).status_code == 400  # tampered after signing
    assert (await http(b"not json", headers)).status_code == 400

    refund = signed_event(SECRET, "evt_2", "charge.refunded", {"id": "ch_1", "object": "charge"})
    assert (response := await http(*refund)).status_code == 200 and response.json() == {"ignored": "charge.refunded"}
    other = payment(setup.client_id, "5")
    other["metadata"] = {"order": "42"}  # someone else's payment on the same Stripe account
    assert (await http(*signed_event(SECRET, "evt_3", "payment_intent.succeeded", other))).status_code == 200

    for bad in (payment(setup.client_id, "lots"), payment(setup.client_id, "0"), payment("nobody", "5")):
        response = await http(*signed_event(SECRET, unique("evt"), "payment_intent.succeeded", bad))
        assert response.status_code == 422, response.text
    assert await purchased(client, setup.client_id) == (0, 0)


async def test_a_refill_request_becomes_one_payment_and_one_refill_topup(
    client: aio.Client, setup: Setup, standin: StripeStandIn
) -> None:
    await client.topup(setup.client_id, 6 * CREDIT, unique("pay"))
    await client.set_auto_refill(
        setup.client_id, "voice", threshold_micros=5 * CREDIT, amount_micros=20 * CREDIT, max_refills_per_period=3
    )
    profile = BillingProfile(customer="cus_dental", payment_method="pm_card_visa")
    adapter = adapter_for(client, standin, **{setup.client_id: profile})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=adapter.app), base_url="http://adapter") as web:
        await adapter.start()
        try:
            session = await client.voice_session(unique("call"), setup.client_id)  # reserves 2 of the 6 credits
            await session.answer()
            await session.hang_up(seconds_used=2)
            await eventually(lambda: standin.charges, "a PaymentIntent for the refill request")
        finally:
            await adapter.stop()
        refills = [e async for e in client.list_events(setup.client_id) if e.type == "EVENT_TYPE_REFILL_REQUESTED"]
        (request,) = refills
        (charge,) = standin.charges
        assert (charge["amount"], charge["currency"], charge["customer"], charge["payment_method"]) == (
            240,  # 20 credits at 12 cents
            "usd",
            "cus_dental",
            "pm_card_visa",
        )
        assert (charge["off_session"], charge["confirm"]) == ("true", "true")
        assert charge["metadata"] == {
            "creditd_account_id": setup.client_id,
            "creditd_balance_type": "voice",
            "creditd_credits": "20",
            "creditd_refill_key": request.idempotency_key,
        }

        # Stripe says the payment succeeded: the refill is credited with creditd's refill key.
        intent = {key: value for key, value in charge.items() if key not in ("off_session", "confirm")}
        webhook = signed_event(SECRET, "evt_refill", "payment_intent.succeeded", intent)
        assert (await web.post("/stripe/webhook", content=webhook[0], headers=webhook[1])).status_code == 200
        assert (await web.post("/stripe/webhook", content=webhook[0], headers=webhook[1])).status_code == 200
    topups = [
        e async for e in client.list_ledger_entries(setup.client_id) if e.kind == ledger_pb2.LEDGER_ENTRY_KIND_TOPUP
    ]
    refill_topups = [e for e in topups if e.topup_kind == ledger_pb2.TOPUP_KIND_AUTO_REFILL]
    assert [(e.idempotency_key, e.amount_micros, e.external_ref) for e in refill_topups] == [
        (request.idempotency_key, 20 * CREDIT, "pi_test_1")
    ]
    assert (await purchased(client, setup.client_id))[0] == 6 * CREDIT - 2 * CREDIT + 20 * CREDIT

    # A restarted adapter finds the request again in its catch-up window: Stripe answers
    # with the same PaymentIntent (same idempotency key), and nothing more is charged.
    requests_before = standin.requests
    restarted = adapter_for(client, standin, **{setup.client_id: profile})
    await restarted.start()
    try:
        await eventually(lambda: standin.requests > requests_before, "the restarted adapter asked Stripe")
    finally:
        await restarted.stop()
    assert len(standin.charges) == 1


async def test_a_declined_card_charges_nothing_and_credits_nothing(
    client: aio.Client, setup: Setup, standin: StripeStandIn
) -> None:
    standin.declined.add("cus_broke")
    adapter = adapter_for(client, standin, **{setup.client_id: BillingProfile("cus_broke", "pm_card_declined")})
    event = Event.from_proto(
        ledger_pb2.Event(
            account_id=setup.client_id,
            type=ledger_pb2.EVENT_TYPE_REFILL_REQUESTED,
            amount_micros=10 * CREDIT,
            idempotency_key=unique("refill"),
        )
    )
    assert await adapter.charge_refill(event) is None
    assert await adapter.charge_refill(event) is None  # handled: not asked again
    assert standin.requests == 1 and standin.charges == []
    assert await purchased(client, setup.client_id) == (0, 0)
