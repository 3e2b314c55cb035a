"""The synchronous client: billing services, dashboards, scripts, creditctl, and voice
workers or SMS senders written as blocking code."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import grpc

from creditd_client import _calls as calls
from creditd_client import aio
from creditd_client._base import ClientBase, address_and_key, options_from
from creditd_client.blocking import BlockingSmsSender, BlockingVoiceSession, EventLoopThread
from creditd_client.enums import EnumArg
from creditd_client.errors import from_rpc_error
from creditd_client.options import OnRetry, Options, RetryPolicy
from creditd_client.types import Authorization, Balances, Event, TopupResult
from creditd_client.v1 import account_pb2, account_pb2_grpc, ledger_pb2, ledger_pb2_grpc, metering_pb2_grpc
from creditd_client.voice import Callback
from creditd_client.watch import Watch

T = TypeVar("T")


class Client(ClientBase):
    """A blocking creditd client. Every call has a deadline (`timeout`, 5 s by default).

    `Client()` with no arguments reads CREDITD_ADDRESS and CREDITD_TOKEN.
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
        self._api_key = key
        self._sessions: tuple[EventLoopThread, aio.Client] | None = None  # opened by the first session
        if self.options.credentials is not None:
            self._channel = grpc.secure_channel(address, self.options.credentials, options=self._channel_options)
        else:
            self._channel = grpc.insecure_channel(address, options=self._channel_options)
        self._stubs: dict[str, Any] = {
            "metering": metering_pb2_grpc.MeteringServiceStub(self._channel),
            "ledger": ledger_pb2_grpc.LedgerServiceStub(self._channel),
            "accounts": account_pb2_grpc.AccountServiceStub(self._channel),
        }

    def close(self) -> None:
        self._channel.close()
        if self._sessions is not None:
            loop, client = self._sessions
            self._sessions = None
            loop.run(client.close())
            loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _run(self, call: calls.Call[T], timeout: float | None = None) -> T:
        method = getattr(self._stubs[call.service], call.method)
        retrier = self._retrier(call.method, call.retry, timeout)
        while True:
            retrier.attempt += 1
            try:
                response = method(call.request, timeout=retrier.remaining(), metadata=self._metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                delay = retrier.next_delay(error)
                if delay is None:
                    raise error from exc
                time.sleep(delay)
                continue
            return call.convert(response)

    def _pages(self, page: Callable[[str], calls.Call[Any]], items: str, timeout: float | None) -> Iterator[Any]:
        """The `items` of each page of a paged call, fetching the next page as they are iterated."""
        token = ""
        while True:
            response = self._run(page(token), timeout)
            yield from getattr(response, items)
            token = response.next_page_token
            if not token:
                return

    # -- sessions ----------------------------------------------------------------------------

    def _session_client(self) -> tuple[EventLoopThread, aio.Client]:
        """Sessions run on the asyncio client, in an event loop thread of this client."""
        if self._sessions is None:
            loop = EventLoopThread()
            self._sessions = loop, aio.Client(self.address, self._api_key, options=self.options)
        return self._sessions

    def voice_session(
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
    ) -> BlockingVoiceSession:
        """Authorize a call; raises `Denied(reason)` when it may not be answered. Then
        `session.answer()` when the call is answered and `session.hang_up()` (see aio)."""
        loop, client = self._session_client()
        session = loop.run(
            client.voice_session(
                session_id,
                client_id,
                direction=direction,
                provider=provider,
                report_interval=report_interval,
                on_grant=on_grant,
                on_warning=on_warning,
                on_cutoff=on_cutoff,
                timeout=timeout,
            )
        )
        return BlockingVoiceSession(loop, session)

    def sms_sender(
        self, client_id: str, *, session_id: str | None = None, direction: EnumArg = "outbound"
    ) -> BlockingSmsSender:
        """An SMS stream for a client, opened by `with client.sms_sender(...) as sender` (or
        `sender.open()`); `sender.send(...)` per message."""
        loop, client = self._session_client()
        return BlockingSmsSender(loop, client.sms_sender(client_id, session_id=session_id, direction=direction))

    # -- metering and ledger ---------------------------------------------------------------

    def authorize(
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
        return self._run(call, timeout)

    def topup(
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
        return self._run(call, timeout)

    def get_balance(self, account_id: str, *, timeout: float | None = None) -> Balances:
        return self._run(calls.get_balance(account_id), timeout)

    def watch_balance(self, account_id: str, *, timeout: float | None = None) -> Watch[Balances]:
        """The current balances, then one item per change. Open until cancelled (or `timeout`)."""
        request = ledger_pb2.WatchBalanceRequest(account_id=account_id)

        def start() -> Any:
            return self._stubs["ledger"].WatchBalance(request, timeout=timeout, metadata=self._metadata)

        return Watch(start, Balances.from_proto, self._retrier("WatchBalance", True, None))

    def watch_events(self, account_id: str, *, timeout: float | None = None) -> Watch[Event]:
        """Events of the account as they happen. Open until cancelled (or `timeout`)."""
        request = ledger_pb2.WatchEventsRequest(account_id=account_id)

        def start() -> Any:
            return self._stubs["ledger"].WatchEvents(request, timeout=timeout, metadata=self._metadata)

        def event(message: Any) -> Event:
            return Event.from_proto(message.event)

        return Watch(start, event, self._retrier("WatchEvents", True, None))

    def list_ledger_entries(
        self,
        account_id: str,
        *,
        balance_type: EnumArg | None = None,
        page_size: int = 100,
        timeout: float | None = None,
    ) -> Iterator[ledger_pb2.LedgerEntry]:
        """The account's ledger, newest first, fetched page by page as it is iterated."""
        page = functools.partial(calls.list_ledger_entries, account_id, balance_type, page_size)
        return self._pages(page, "entries", timeout)

    def list_events(self, account_id: str, *, page_size: int = 100, timeout: float | None = None) -> Iterator[Event]:
        """The account's events, newest first, fetched page by page as it is iterated."""
        return map(
            Event.from_proto,
            self._pages(functools.partial(calls.list_events, account_id, page_size), "events", timeout),
        )

    def get_usage(
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
        return self._run(calls.get_usage(account_id, start, end, balance_type, group_by), timeout)

    # -- accounts ----------------------------------------------------------------------------

    def list_accounts(
        self, agency_id: str = "", *, page_size: int = 100, timeout: float | None = None
    ) -> Iterator[account_pb2.Account]:
        """The agency's clients by id (no agency: a platform admin's agencies, an agency
        admin's own clients), fetched page by page as they are iterated."""
        return self._pages(functools.partial(calls.list_accounts, agency_id, page_size), "accounts", timeout)

    def list_plans(
        self, agency_id: str = "", *, page_size: int = 100, timeout: float | None = None
    ) -> Iterator[account_pb2.Plan]:
        """The agency's plans by id (no agency: an agency admin's own), page by page."""
        return self._pages(functools.partial(calls.list_plans, agency_id, page_size), "plans", timeout)

    def create_agency(
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
        return self._run(call, timeout)

    def create_plan(
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
        return self._run(calls.create_plan(agency_id, plan_id, fields), timeout)

    def update_plan(
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
        return self._run(calls.update_plan(agency_id, plan_id, changes), timeout)

    def get_plan(self, agency_id: str, plan_id: str, *, timeout: float | None = None) -> account_pb2.Plan:
        return self._run(calls.get_plan(agency_id, plan_id), timeout)

    def create_client(
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
        return self._run(call, timeout)

    def update_subscription(
        self,
        account_id: str,
        *,
        inbound_active: bool | None = None,
        outbound_active: bool | None = None,
        timeout: float | None = None,
    ) -> account_pb2.Account:
        """Activate or suspend a direction (None leaves it); suspending cuts its live calls."""
        return self._run(calls.update_subscription(account_id, inbound_active, outbound_active), timeout)

    def set_auto_refill(
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
        return self._run(call, timeout)

    def set_low_balance_warning(
        self, account_id: str, balance_type: EnumArg, threshold_micros: int, *, timeout: float | None = None
    ) -> account_pb2.Account:
        return self._run(calls.set_low_balance_warning(account_id, balance_type, threshold_micros), timeout)

    def get_account(self, account_id: str, *, timeout: float | None = None) -> account_pb2.Account:
        return self._run(calls.get_account(account_id), timeout)

    def create_api_key(
        self, role: EnumArg, account_id: str = "", *, description: str = "", timeout: float | None = None
    ) -> account_pb2.CreateApiKeyResponse:
        """A new key (`.key_id`, `.secret` shown only here, `.api_key`)."""
        return self._run(calls.create_api_key(role, account_id, description), timeout)

    def revoke_api_key(self, key_id: str, *, timeout: float | None = None) -> account_pb2.ApiKey:
        return self._run(calls.revoke_api_key(key_id), timeout)

    def list_api_keys(self, account_id: str = "", *, timeout: float | None = None) -> list[account_pb2.ApiKey]:
        return self._run(calls.list_api_keys(account_id), timeout)
