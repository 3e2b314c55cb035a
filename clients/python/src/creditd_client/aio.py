"""The asyncio client: voice workers, SMS senders and async services.

    async with creditd_client.aio.Client("127.0.0.1:50051", api_key) as client:
        session = await client.voice_session("call-1", "dental-1", provider="elevenlabs")
        await session.answer()
        ...
        summary = await session.hang_up()

Every method has a sync twin on `creditd_client.Client`, except the sessions.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import grpc

from creditd_client import _calls as calls
from creditd_client._base import ClientBase, address_and_key, options_from
from creditd_client.enums import EnumArg
from creditd_client.errors import Denied, from_rpc_error
from creditd_client.options import OnRetry, Options, RetryPolicy
from creditd_client.sms import SmsSender
from creditd_client.types import Authorization, Balances, Event, TopupResult
from creditd_client.v1 import account_pb2, account_pb2_grpc, ledger_pb2, ledger_pb2_grpc, metering_pb2_grpc
from creditd_client.voice import Callback, VoiceSession
from creditd_client.watch import AsyncWatch

__all__ = ["Client"]
T = TypeVar("T")


class Client(ClientBase):
    """An asyncio creditd client. Every call has a deadline (`timeout`, 5 s by default).

    `Client()` with no arguments reads CREDITD_ADDRESS and CREDITD_TOKEN. The channel is
    opened on first use, in the running event loop.
    """

    def __init__(
        self,
        address: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        on_retry: OnRetry | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, Any]] | None = None,
        options: Options | None = None,
    ) -> None:
        address, key = address_and_key(address, api_key)
        super().__init__(address, key, options_from(options, timeout, retry, on_retry, credentials, channel_options))
        self._channel: Any = None
        self._stubs: dict[str, Any] = {}

    def _stub(self, service: str) -> Any:
        if self._channel is None:
            if self.options.credentials is not None:
                self._channel = grpc.aio.secure_channel(
                    self.address, self.options.credentials, options=self._channel_options
                )
            else:
                self._channel = grpc.aio.insecure_channel(self.address, options=self._channel_options)
            self._stubs = {
                "metering": metering_pb2_grpc.MeteringServiceStub(self._channel),
                "ledger": ledger_pb2_grpc.LedgerServiceStub(self._channel),
                "accounts": account_pb2_grpc.AccountServiceStub(self._channel),
            }
        return self._stubs[service]

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _run(self, call: calls.Call[T], timeout: float | None = None) -> T:
        method = getattr(self._stub(call.service), call.method)
        retrier = self._retrier(call.method, call.retry, timeout)
        while True:
            retrier.attempt += 1
            try:
                response = await method(call.request, timeout=retrier.remaining(), metadata=self._metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                delay = retrier.next_delay(error)
                if delay is None:
                    raise error from exc
                await asyncio.sleep(delay)
                continue
            return call.convert(response)

    async def _pages(
        self, page: Callable[[str], calls.Call[Any]], items: str, timeout: float | None
    ) -> AsyncIterator[Any]:
        """The `items` of each page of a paged call, fetching the next page as they are iterated."""
        token = ""
        while True:
            response = await self._run(page(token), timeout)
            for item in getattr(response, items):
                yield item
            token = response.next_page_token
            if not token:
                return

    def _usage_stream(self) -> Any:
        """A new StreamUsage call; it lives as long as the session (no deadline)."""
        return self._stub("metering").StreamUsage(metadata=self._metadata)

    # -- sessions ----------------------------------------------------------------------------

    async def voice_session(
        self,
        session_id: str,
        client_id: str,
        *,
        direction: EnumArg = "inbound",
        provider: str = "",
        report_interval: float = 5.0,
        on_grant: Callback | None = None,
        on_warning: Callback | None = None,
        on_cutoff: Callback | None = None,
        timeout: float | None = None,
    ) -> VoiceSession:
        """Authorize a call; raises `Denied(reason)` when it may not be answered.

        Then `await session.answer()` when the call is answered and `await session.hang_up()`.
        """
        authorization = await self.authorize(
            session_id, client_id, direction=direction, provider=provider, timeout=timeout
        )
        if not authorization.allowed:
            raise Denied(authorization.deny_reason, authorization)
        return VoiceSession(
            self,
            session_id,
            client_id,
            authorization,
            report_interval=report_interval,
            on_grant=on_grant,
            on_warning=on_warning,
            on_cutoff=on_cutoff,
        )

    def sms_sender(
        self, client_id: str, *, session_id: str | None = None, direction: EnumArg = "outbound"
    ) -> SmsSender:
        """An SMS stream for a client, opened by `async with client.sms_sender(...) as sender`
        (or `sender = await client.sms_sender(...)`); `await sender.send(...)` per message."""
        return SmsSender(self, client_id, session_id=session_id, direction=direction)

    # -- metering and ledger ---------------------------------------------------------------

    async def authorize(
        self,
        session_id: str,
        client_id: str,
        *,
        direction: EnumArg = "inbound",
        provider: str = "",
        channel: EnumArg = "voice",
        destination_country: str = "",
        quantity: int = 0,
        timeout: float | None = None,
    ) -> Authorization:
        """Authorize (idempotent by session_id, so retried on UNAVAILABLE). A denial is an answer."""
        call = calls.authorize(session_id, client_id, direction, provider, channel, destination_country, quantity)
        return await self._run(call, timeout)

    async def topup(
        self,
        account_id: str,
        amount_micros: int,
        idempotency_key: str,
        *,
        balance_type: EnumArg = "voice",
        kind: EnumArg = "purchase",
        external_ref: str = "",
        timeout: float | None = None,
    ) -> TopupResult:
        """Credit an account once per idempotency key (retried on UNAVAILABLE with the same key)."""
        call = calls.topup(account_id, amount_micros, idempotency_key, balance_type, kind, external_ref)
        return await self._run(call, timeout)

    async def get_balance(self, account_id: str, *, timeout: float | None = None) -> Balances:
        return await self._run(calls.get_balance(account_id), timeout)

    def watch_balance(self, account_id: str, *, timeout: float | None = None) -> AsyncWatch[Balances]:
        """The current balances, then one item per change. Open until cancelled (or `timeout`)."""
        request = ledger_pb2.WatchBalanceRequest(account_id=account_id)

        def start() -> Any:
            return self._stub("ledger").WatchBalance(request, timeout=timeout, metadata=self._metadata)

        return AsyncWatch(start, Balances.from_proto, self._retrier("WatchBalance", True, None))

    def watch_events(self, account_id: str, *, timeout: float | None = None) -> AsyncWatch[Event]:
        """Events of the account as they happen. Open until cancelled (or `timeout`)."""
        request = ledger_pb2.WatchEventsRequest(account_id=account_id)

        def start() -> Any:
            return self._stub("ledger").WatchEvents(request, timeout=timeout, metadata=self._metadata)

        def event(message: Any) -> Event:
            return Event.from_proto(message.event)

        return AsyncWatch(start, event, self._retrier("WatchEvents", True, None))

    async def list_ledger_entries(
        self,
        account_id: str,
        *,
        balance_type: EnumArg | None = None,
        page_size: int = 100,
        timeout: float | None = None,
    ) -> AsyncIterator[ledger_pb2.LedgerEntry]:
        """The account's ledger, newest first, fetched page by page as it is iterated."""
        async for entry in self._pages(
            functools.partial(calls.list_ledger_entries, account_id, balance_type, page_size), "entries", timeout
        ):
            yield entry

    async def list_events(
        self, account_id: str, *, page_size: int = 100, timeout: float | None = None
    ) -> AsyncIterator[Event]:
        """The account's events, newest first, fetched page by page as it is iterated."""
        async for event in self._pages(functools.partial(calls.list_events, account_id, page_size), "events", timeout):
            yield Event.from_proto(event)

    async def get_usage(
        self,
        account_id: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        balance_type: EnumArg | None = None,
        group_by: Iterable[EnumArg] = (),
        timeout: float | None = None,
    ) -> list[ledger_pb2.UsageRow]:
        """What the account consumed in [start, end) (default: since the first entry, until now),
        one row per group of `group_by` ("channel", "provider", "country", "client", "day")."""
        return await self._run(calls.get_usage(account_id, start, end, balance_type, group_by), timeout)

    # -- accounts ----------------------------------------------------------------------------

    async def list_accounts(
        self, agency_id: str = "", *, page_size: int = 100, timeout: float | None = None
    ) -> AsyncIterator[account_pb2.Account]:
        """The agency's clients by id (no agency: a platform admin's agencies, an agency
        admin's own clients), fetched page by page as they are iterated."""
        async for account in self._pages(
            functools.partial(calls.list_accounts, agency_id, page_size), "accounts", timeout
        ):
            yield account

    async def list_plans(
        self, agency_id: str = "", *, page_size: int = 100, timeout: float | None = None
    ) -> AsyncIterator[account_pb2.Plan]:
        """The agency's plans by id (no agency: an agency admin's own), page by page."""
        async for plan in self._pages(functools.partial(calls.list_plans, agency_id, page_size), "plans", timeout):
            yield plan

    async def create_agency(
        self,
        agency_id: str,
        display_name: str = "",
        *,
        free_voice_micros: int | None = None,
        free_sms_micros: int | None = None,
        voice_rates: Mapping[str, int] | None = None,
        default_voice_micros_per_minute: int | None = None,
        sms_rates: Mapping[str, int] | None = None,
        default_sms_micros_per_segment: int | None = None,
        period_anchor_day: int = 0,
        timeout: float | None = None,
    ) -> account_pb2.Account:
        """Platform admins: a new agency. Unset overrides take the platform defaults; 0 is a value."""
        call = calls.create_agency(
            agency_id,
            display_name,
            free_voice_micros,
            free_sms_micros,
            voice_rates,
            default_voice_micros_per_minute,
            sms_rates,
            default_sms_micros_per_segment,
            period_anchor_day,
        )
        return await self._run(call, timeout)

    async def create_plan(
        self,
        agency_id: str,
        plan_id: str,
        *,
        free_voice_micros: int = 0,
        free_sms_micros: int = 0,
        voice_rates: Mapping[str, int] | None = None,
        default_voice_micros_per_minute: int = 0,
        sms_rates: Mapping[str, int] | None = None,
        default_sms_micros_per_segment: int = 0,
        usage_limit_micros: int = 0,
        max_concurrent_sessions: int = 0,
        timeout: float | None = None,
    ) -> account_pb2.Plan:
        fields = {
            "free_voice_micros": free_voice_micros,
            "free_sms_micros": free_sms_micros,
            "voice_rates": voice_rates or {},
            "default_voice_micros_per_minute": default_voice_micros_per_minute,
            "sms_rates": sms_rates or {},
            "default_sms_micros_per_segment": default_sms_micros_per_segment,
            "usage_limit_micros": usage_limit_micros,
            "max_concurrent_sessions": max_concurrent_sessions,
        }
        return await self._run(calls.create_plan(agency_id, plan_id, fields), timeout)

    async def update_plan(
        self,
        agency_id: str,
        plan_id: str,
        *,
        free_voice_micros: int | None = None,
        free_sms_micros: int | None = None,
        voice_rates: Mapping[str, int] | None = None,
        default_voice_micros_per_minute: int | None = None,
        sms_rates: Mapping[str, int] | None = None,
        default_sms_micros_per_segment: int | None = None,
        usage_limit_micros: int | None = None,
        max_concurrent_sessions: int | None = None,
        timeout: float | None = None,
    ) -> account_pb2.Plan:
        """Change the fields given (the others stay); clients see it from their next slice."""
        changes = {
            "free_voice_micros": free_voice_micros,
            "free_sms_micros": free_sms_micros,
            "voice_rates": voice_rates,
            "default_voice_micros_per_minute": default_voice_micros_per_minute,
            "sms_rates": sms_rates,
            "default_sms_micros_per_segment": default_sms_micros_per_segment,
            "usage_limit_micros": usage_limit_micros,
            "max_concurrent_sessions": max_concurrent_sessions,
        }
        return await self._run(calls.update_plan(agency_id, plan_id, changes), timeout)

    async def get_plan(self, agency_id: str, plan_id: str, *, timeout: float | None = None) -> account_pb2.Plan:
        return await self._run(calls.get_plan(agency_id, plan_id), timeout)

    async def create_client(
        self,
        client_id: str,
        agency_id: str,
        plan_id: str,
        *,
        billing_mode: EnumArg = "rebilling",
        display_name: str = "",
        period_anchor_day: int = 0,
        timeout: float | None = None,
    ) -> account_pb2.Account:
        call = calls.create_client(client_id, agency_id, plan_id, billing_mode, display_name, period_anchor_day)
        return await self._run(call, timeout)

    async def update_subscription(
        self,
        account_id: str,
        *,
        inbound_active: bool | None = None,
        outbound_active: bool | None = None,
        timeout: float | None = None,
    ) -> account_pb2.Account:
        """Activate or suspend a direction (None leaves it); suspending cuts its live calls."""
        return await self._run(calls.update_subscription(account_id, inbound_active, outbound_active), timeout)

    async def set_auto_refill(
        self,
        account_id: str,
        balance_type: EnumArg,
        *,
        enabled: bool = True,
        threshold_micros: int = 0,
        amount_micros: int = 0,
        target_balance_micros: int = 0,
        max_refills_per_period: int = 0,
        timeout: float | None = None,
    ) -> account_pb2.Account:
        call = calls.set_auto_refill(
            account_id,
            balance_type,
            enabled,
            threshold_micros,
            amount_micros,
            target_balance_micros,
            max_refills_per_period,
        )
        return await self._run(call, timeout)

    async def set_low_balance_warning(
        self, account_id: str, balance_type: EnumArg, threshold_micros: int, *, timeout: float | None = None
    ) -> account_pb2.Account:
        return await self._run(calls.set_low_balance_warning(account_id, balance_type, threshold_micros), timeout)

    async def get_account(self, account_id: str, *, timeout: float | None = None) -> account_pb2.Account:
        return await self._run(calls.get_account(account_id), timeout)

    async def create_api_key(
        self, role: EnumArg, account_id: str = "", *, description: str = "", timeout: float | None = None
    ) -> account_pb2.CreateApiKeyResponse:
        """A new key (`.key_id`, `.secret` shown only here, `.api_key`)."""
        return await self._run(calls.create_api_key(role, account_id, description), timeout)

    async def revoke_api_key(self, key_id: str, *, timeout: float | None = None) -> account_pb2.ApiKey:
        return await self._run(calls.revoke_api_key(key_id), timeout)

    async def list_api_keys(self, account_id: str = "", *, timeout: float | None = None) -> list[account_pb2.ApiKey]:
        return await self._run(calls.list_api_keys(account_id), timeout)
