"""Stripe payments for creditd: a small ASGI app (Starlette) that an agency runs beside creditd.

    from creditd_client import aio
    from creditd_client.stripe import BillingProfile, StripeAdapter

    adapter = StripeAdapter(
        aio.Client("creditd:50051", agency_admin_key),
        stripe.StripeClient(stripe_secret_key, http_client=stripe.HTTPXClient()),
        webhook_secret="whsec_...",
        profiles={"dental-1": BillingProfile(customer="cus_...", payment_method="pm_...")},
        unit_amount_per_credit=12,  # 12 cents a credit
    )
    app = adapter.app  # uvicorn module:app; Stripe posts to /stripe/webhook

Payments: a `payment_intent.succeeded` webhook whose PaymentIntent carries creditd metadata
(`creditd_account_id`, `creditd_balance_type` "voice" or "sms", `creditd_credits` such as
"12.5") becomes one Topup, whose idempotency key holds the Stripe event id: Stripe's retries
and replays credit nothing twice. The signature is checked by the `stripe` library.

Auto-refill: for each account with a billing profile the app watches creditd's events; a
REFILL_REQUESTED event becomes one off-session PaymentIntent on the saved card (its Stripe
idempotency key derived from creditd's refill key, so a repeat is the same payment), whose
success webhook credits the refill with creditd's refill key as a TOPUP_KIND_AUTO_REFILL.
Requests raised while the app was down are picked up when it starts, if younger than
`catch_up_seconds` (less than the 24 hours Stripe keeps idempotency keys).

HTTP answers to Stripe: 200 for a handled, repeated, unknown or non-creditd event; 400 for
a missing or bad signature or payload (nothing changes); 422 when creditd refuses the
top-up for good (bad metadata, unknown account): Stripe retries and shows the failure, so
it can be fixed and the payment still credited; 503 while creditd is unavailable (Stripe
retries). Needs `pip install 'creditd-client[stripe]'`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import stripe
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from creditd_client.aio import Client
from creditd_client.credits import format_credits, to_micros
from creditd_client.errors import CreditdError, DeadlineExceeded, Unavailable
from creditd_client.types import Event

__all__ = ["BillingProfile", "StripeAdapter"]

REFILL_REQUESTED = "EVENT_TYPE_REFILL_REQUESTED"
log = logging.getLogger("creditd_client.stripe")
# The metadata of a creditd payment.
ACCOUNT = "creditd_account_id"
BALANCE = "creditd_balance_type"
CREDITS = "creditd_credits"
REFILL_KEY = "creditd_refill_key"
STRIPE_IDEMPOTENCY_SECONDS = 24 * 3600
# Transient Stripe failures are retried with the same idempotency key, so never paid twice.
RETRY_DELAYS = (0.5, 2.0, 5.0)


@dataclass(frozen=True)
class BillingProfile:
    """Where an account's auto-refills are charged: a Stripe customer and its saved card."""

    customer: str
    payment_method: str


class StripeAdapter:
    def __init__(
        self,
        creditd: Client,
        stripe_client: stripe.StripeClient,
        *,
        webhook_secret: str,
        profiles: Mapping[str, BillingProfile],
        unit_amount_per_credit: int,
        currency: str = "usd",
        path: str = "/stripe/webhook",
        catch_up_seconds: float = 3600.0,
        rescan_seconds: float = 60.0,
    ) -> None:
        if not 0 < catch_up_seconds < STRIPE_IDEMPOTENCY_SECONDS:
            raise ValueError("catch_up_seconds must be positive and under Stripe's 24 hours of idempotency")
        if unit_amount_per_credit <= 0:
            raise ValueError("unit_amount_per_credit must be positive (the price of a credit in the currency's cents)")
        self.creditd = creditd
        self.stripe = stripe_client
        self.webhook_secret = webhook_secret
        self.profiles = dict(profiles)
        self.unit_amount_per_credit = unit_amount_per_credit
        self.currency = currency
        self.catch_up_seconds = catch_up_seconds
        self.rescan_seconds = rescan_seconds
        self._charged: dict[str, float] = {}  # refill key -> when it was charged (within the window)
        self._charging: dict[str, asyncio.Lock] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.app = Starlette(routes=[Route(path, self.webhook, methods=["POST"])], lifespan=self._lifespan)

    # -- webhooks ------------------------------------------------------------------------------

    async def webhook(self, request: Request) -> JSONResponse:
        payload = await request.body()
        try:
            event = self.stripe.construct_event(payload, request.headers.get("stripe-signature"), self.webhook_secret)
        except stripe.SignatureVerificationError:
            return JSONResponse({"error": "invalid Stripe signature"}, status_code=400)
        except ValueError:
            return JSONResponse({"error": "invalid payload"}, status_code=400)
        if event.type != "payment_intent.succeeded":
            return JSONResponse({"ignored": event.type})
        intent = event.data.object.to_dict()
        metadata = dict(intent.get("metadata") or {})
        if ACCOUNT not in metadata:
            return JSONResponse({"ignored": "not a creditd payment"})
        try:
            account_id, balance_type, micros = _purchase(metadata)
        except ValueError as bad:
            log.error("Stripe event %s: bad creditd metadata: %s", event.id, bad)
            return JSONResponse({"error": str(bad)}, status_code=422)
        refill_key = metadata.get(REFILL_KEY, "")
        try:
            result = await self.creditd.topup(
                account_id,
                micros,
                refill_key or f"stripe:{event.id}",
                balance_type=balance_type,
                kind="auto_refill" if refill_key else "purchase",
                external_ref=str(intent["id"]),
            )
        except (Unavailable, DeadlineExceeded) as error:
            return JSONResponse({"error": f"creditd unavailable: {error.reason}"}, status_code=503)
        except CreditdError as refused:
            log.error("Stripe event %s: creditd refused the top-up: %s", event.id, refused)
            return JSONResponse({"error": refused.reason, "message": refused.message}, status_code=422)
        return JSONResponse({"entry_id": result.entry_id})

    # -- auto-refill ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start following the refill requests of every account with a billing profile."""
        for account_id in self.profiles:
            self._tasks.append(asyncio.create_task(self._watch(account_id), name=f"stripe-watch:{account_id}"))
            self._tasks.append(asyncio.create_task(self._rescan(account_id), name=f"stripe-rescan:{account_id}"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def _watch(self, account_id: str) -> None:
        """Refill requests as they happen (the rescans cover what a lost watch misses)."""
        while True:
            try:
                async with self.creditd.watch_events(account_id) as events:
                    async for event in events:
                        if event.type == REFILL_REQUESTED:
                            await self.charge_refill(event)
            except CreditdError as error:
                log.warning("watching events of %s: %s; watching again", account_id, error)
            await asyncio.sleep(1.0)

    async def _rescan(self, account_id: str) -> None:
        """At start and then every `rescan_seconds`: refill requests of the catch-up window."""
        while True:
            try:
                await self.catch_up(account_id)
            except CreditdError as error:
                log.warning("listing events of %s: %s", account_id, error)
            await asyncio.sleep(self.rescan_seconds)

    async def catch_up(self, account_id: str) -> None:
        oldest = time.time() - self.catch_up_seconds
        async for event in self.creditd.list_events(account_id):  # newest first
            if event.created_at is not None and event.created_at.timestamp() < oldest:
                break
            if event.type == REFILL_REQUESTED:
                await self.charge_refill(event)

    async def charge_refill(self, event: Event) -> Any:
        """One off-session PaymentIntent for one refill request; None if it was not charged
        (not this adapter's account, handled already, or the card was declined)."""
        key, account_id = event.idempotency_key, event.account_id
        profile = self.profiles.get(account_id)
        if profile is None or not key or event.amount_micros <= 0:
            return None
        lock = self._charging.setdefault(key, asyncio.Lock())
        async with lock:  # the watch and a rescan may both see the same request
            if key in self._charged:
                return None
            try:
                intent = await self._create_intent(account_id, event, profile)
            except stripe.StripeError as error:  # not recorded: the next rescan tries again, same key
                log.error("auto-refill %s of %s: Stripe failed: %s", key, account_id, error)
                return None
            self._forget_old()
            self._charged[key] = time.time()
        self._charging.pop(key, None)
        return intent

    async def _create_intent(self, account_id: str, event: Event, profile: BillingProfile) -> Any:
        credits = format_credits(event.amount_micros)
        balance = "sms" if event.balance_type == "BALANCE_TYPE_SMS" else "voice"
        params: Any = {
            "amount": -(-event.amount_micros * self.unit_amount_per_credit // 1_000_000),  # rounded up
            "currency": self.currency,
            "customer": profile.customer,
            "payment_method": profile.payment_method,
            "off_session": True,
            "confirm": True,
            "description": f"Auto-refill of {credits} {balance} credits for {account_id}",
            "metadata": {ACCOUNT: account_id, BALANCE: balance, CREDITS: credits, REFILL_KEY: event.idempotency_key},
        }
        options: Any = {"idempotency_key": f"creditd-refill:{event.idempotency_key}"}
        for delay in (*RETRY_DELAYS, None):
            try:
                return await self.stripe.v1.payment_intents.create_async(params, options)
            except stripe.CardError as declined:  # declined, or the bank wants the customer present
                log.error("auto-refill %s of %s: card declined: %s", event.idempotency_key, account_id, declined)
                return None
            except (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError) as error:
                if delay is None:
                    raise
                log.warning("auto-refill %s: Stripe failed (%s); retrying", event.idempotency_key, error)
                await asyncio.sleep(delay)
        return None

    def _forget_old(self) -> None:
        oldest = time.time() - STRIPE_IDEMPOTENCY_SECONDS
        for key in [k for k, at in self._charged.items() if at < oldest]:
            del self._charged[key]


def _purchase(metadata: Mapping[str, str]) -> tuple[str, str, int]:
    """(account id, balance type, micro-credits) of a creditd payment's metadata."""
    account_id = metadata[ACCOUNT].strip()
    balance_type = (metadata.get(BALANCE) or "voice").strip().lower()
    if balance_type not in ("voice", "sms"):
        raise ValueError(f"{BALANCE} must be voice or sms, not {balance_type!r}")
    try:
        micros = to_micros(metadata.get(CREDITS, ""))
    except (TypeError, ValueError) as bad:
        raise ValueError(f"{CREDITS}: {bad}") from None
    if micros <= 0:
        raise ValueError(f"{CREDITS} must be more than 0")
    return account_id, balance_type, micros
