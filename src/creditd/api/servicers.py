"""The three creditd.v1 services. Each handler authenticates, checks scope, converts, delegates."""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator
from typing import Any, TypeAlias, TypeVar

import grpc
from creditd_client.v1 import (
    account_pb2,
    ledger_pb2,
    metering_pb2,
)

from creditd import logs
from creditd.api import convert, limits, requests
from creditd.api.auth import Action, Authenticator, Principal
from creditd.api.errors import Malformed, reject, streaming, unary
from creditd.domain.accounts import Account, AccountKind, BillingMode, Channel, Direction, Plan, Role
from creditd.domain.records import BalanceType, TopupKind
from creditd.domain.usage import UsageTotals
from creditd.domain.wallet import RefillSettings
from creditd.engine import validation
from creditd.engine.accounts import Accounts
from creditd.engine.context import Context
from creditd.engine.ledger import Ledger
from creditd.engine.messages import TERMINAL, CutoffMsg
from creditd.engine.metering import Metering, UsageStream
from creditd.errors import CreditdError, InvalidArgument
from creditd.telemetry import Telemetry, deny_reason_name

WATCH_REFRESH_SECONDS = 5.0  # a balance watch reads again at least this often
Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]
_CHANNELS = {int(Channel.VOICE): "voice", int(Channel.SMS): "sms"}
E = TypeVar("E", bound=enum.IntEnum)


def _enum(value: int, kind: type[E], field: str, allowed: str) -> E:
    """A required enum field (the edge checks let UNSPECIFIED through) as the domain's value."""
    try:
        return kind(value)
    except ValueError:
        raise InvalidArgument(f"{field} must be {allowed}", field) from None


# The servicers implement the generated servicer interfaces without subclassing their
# (untyped) base classes: the generated add_*_to_server functions look every method up.
class MeteringServicer:
    def __init__(
        self, ctx: Context, auth: Authenticator, metering: Metering, telemetry: Telemetry | None = None
    ) -> None:
        self.ctx, self.auth, self.metering, self.telemetry = ctx, auth, metering, telemetry

    @unary
    async def Authorize(self, request: metering_pb2.AuthorizeRequest, context: Ctx) -> metering_pb2.AuthorizeResponse:
        try:
            response = await self._authorize(request, context)
        except Exception as exc:
            if self.telemetry is not None:
                reason = exc.reason if isinstance(exc, CreditdError) else "INTERNAL"
                self.telemetry.authorization(_CHANNELS.get(request.channel, "invalid"), "error", reason.lower())
            raise
        if self.telemetry is not None:
            self.telemetry.authorization(
                _CHANNELS.get(request.channel, "invalid"),
                "allowed" if response.allowed else "denied",
                _deny_reason_label(response.deny_reason),
            )
        return response

    async def _authorize(self, request: metering_pb2.AuthorizeRequest, context: Ctx) -> metering_pb2.AuthorizeResponse:
        principal = await self.auth.principal(context)
        channel = _enum(request.channel, Channel, "channel", "CHANNEL_VOICE or CHANNEL_SMS")
        direction = _enum(request.direction, Direction, "direction", "DIRECTION_INBOUND or DIRECTION_OUTBOUND")
        validation.require_id(request.client_id, "client_id")
        principal.require(Action.METER, await self.ctx.catalog.account(request.client_id))
        provider = request.provider.strip().lower()
        if provider:
            validation.voice_rates({provider: 0}, "provider")
        result = await self.metering.authorize(
            request.session_id,
            request.client_id,
            channel,
            direction,
            provider,
            request.destination_country,
            request.quantity,
        )
        response = metering_pb2.AuthorizeResponse(
            allowed=result.allowed,
            deny_reason=convert.deny_reason(result.deny_reason),
            granted_seconds=result.granted_seconds,
            max_seconds=result.max_seconds,
        )
        if result.expires_at:
            response.expires_at.CopyFrom(convert.timestamp(result.expires_at))
        return response

    async def StreamUsage(self, request_iterator: Any, context: Ctx) -> None:
        # Reader/writer style rather than an async generator: a live call is then one
        # waiting coroutine per side (the reader's next message, the writer's next item),
        # without the generator objects, their weak references and finalizer hooks that
        # each generator layer (this handler, the interceptor's, gRPC's request iterator)
        # would keep for the whole call.
        try:
            principal = await self.auth.principal(context)
        except CreditdError as exc:
            reject(context, exc)
            return
        stream = self.metering.open_stream()
        reader = asyncio.create_task(self._read_usage(stream, principal, context))
        try:
            while True:
                item = await stream.out.get()
                if isinstance(item, Exception):
                    reject(context, item)
                    return
                if isinstance(item, CutoffMsg) and stream.sms is not None and self.telemetry is not None:
                    self.telemetry.cutoff("sms", item.reason)  # voice cutoffs are counted when settled
                await context.write(convert.stream_response(item))
                if isinstance(item, TERMINAL):
                    return
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            stream.close()

    async def _read_usage(self, stream: UsageStream, principal: Principal, context: Ctx) -> None:
        """The requests of one StreamUsage call, until the caller closes its side."""
        try:
            while (message := await context.read()) is not grpc.aio.EOF:
                if isinstance(message, Malformed):
                    raise message.error("/creditd.v1.MeteringService/StreamUsage")
                if message.WhichOneof("msg") == "usage" and stream.voice is not None:
                    # Nine messages in ten of a live call: the one field is checked by
                    # report(); nothing else to look up.
                    stream.report(message.usage.seconds_used)
                    continue
                limits.check(message)
                request = convert.stream_request(message)
                if hasattr(request, "client_id"):
                    # checked before the catalog sees it (a NUL byte would reach the database)
                    validation.require_id(request.client_id, "start.client_id")
                    principal.require(Action.METER, await self.ctx.catalog.account(request.client_id))
                    if logs.session_id.get() is None:
                        logs.session_id.set(str(getattr(request, "session_id", ""))[: logs.MAX_LOGGED_ID] or None)
                await stream.handle(request)
                if stream.finished:
                    return  # ended: the stream closes once its last message is out
            stream.half_closed()
        except CreditdError as exc:
            stream.out.put(exc)
        except Exception as exc:  # the caller went away or sent garbage
            if not isinstance(exc, asyncio.CancelledError | grpc.aio.AioRpcError):
                stream.out.put(CreditdError(str(exc) or "stream failed"))


class LedgerServicer:
    def __init__(self, ctx: Context, auth: Authenticator, ledger: Ledger) -> None:
        self.ctx, self.auth, self.ledger = ctx, auth, ledger

    @unary
    async def Topup(self, request: ledger_pb2.TopupRequest, context: Ctx) -> ledger_pb2.TopupResponse:
        principal = await self.auth.principal(context)
        validation.require_id(request.account_id, "account_id")
        balance_type = convert.balance_type(request.balance_type)
        amount = validation.require_amount(request.amount_micros, "amount_micros", allow_zero=False)
        kind = _enum(request.kind, TopupKind, "kind", "a TOPUP_KIND_* value")
        key = validation.require_text(request.idempotency_key, "idempotency_key")
        ref = validation.optional_text(request.external_ref, "external_ref")
        principal.require(Action.TOPUP, await self.ctx.catalog.account(request.account_id))
        entry, wallet = await self.ledger.topup(request.account_id, balance_type, amount, kind, key, ref)
        return ledger_pb2.TopupResponse(entry_id=entry.entry_id, balance=convert.balance(wallet))

    async def _balances(self, account_id: str, context: Ctx) -> ledger_pb2.GetBalanceResponse:
        principal = await self.auth.principal(context)
        validation.require_id(account_id, "account_id")
        principal.require(Action.READ, await self.ctx.catalog.account(account_id))
        _, wallets = await self.ledger.wallets(account_id)
        return ledger_pb2.GetBalanceResponse(
            account_id=account_id,
            voice=convert.balance(wallets[BalanceType.VOICE]),
            sms=convert.balance(wallets[BalanceType.SMS]),
        )

    @unary
    async def GetBalance(self, request: ledger_pb2.GetBalanceRequest, context: Ctx) -> ledger_pb2.GetBalanceResponse:
        return await self._balances(request.account_id, context)

    @streaming
    async def WatchBalance(
        self, request: ledger_pb2.WatchBalanceRequest, context: Ctx
    ) -> AsyncIterator[ledger_pb2.WatchBalanceResponse]:
        # Every read checks the key and its scope again (in _balances); a revocation wakes
        # the watch too, so a revoked key's watch ends at once.
        channel = f"balance:{request.account_id}"
        bus = self.ctx.bus
        async with (
            bus.watch(request.account_id),
            bus.subscribe(lambda c: c == channel or c.startswith("apikey:")) as changes,
        ):
            last = None
            while True:
                current = await self._balances(request.account_id, context)
                if current != last:
                    yield ledger_pb2.WatchBalanceResponse(
                        account_id=current.account_id, voice=current.voice, sms=current.sms
                    )
                    last = current
                # A change on a replica that had not yet heard of this watch is caught by the
                # next read at the latest.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changes.get(), WATCH_REFRESH_SECONDS)
                while not changes.empty():  # many changes at once: one read
                    changes.get_nowait()

    @unary
    async def ListLedgerEntries(
        self, request: ledger_pb2.ListLedgerEntriesRequest, context: Ctx
    ) -> ledger_pb2.ListLedgerEntriesResponse:
        principal = await self.auth.principal(context)
        validation.require_id(request.account_id, "account_id")
        principal.require(Action.READ, await self.ctx.catalog.account(request.account_id))
        kind = convert.balance_type(request.balance_type) if request.balance_type else None
        entries, cursor = await self.ledger.entries(
            request.account_id, kind, requests.page_size(request.page_size), request.page_token or None
        )
        return ledger_pb2.ListLedgerEntriesResponse(
            entries=[convert.ledger_entry(e) for e in entries], next_page_token=cursor or ""
        )

    @unary
    async def ListEvents(self, request: ledger_pb2.ListEventsRequest, context: Ctx) -> ledger_pb2.ListEventsResponse:
        principal = await self.auth.principal(context)
        validation.require_id(request.account_id, "account_id")
        principal.require(Action.READ, await self.ctx.catalog.account(request.account_id))
        events, cursor = await self.ledger.events(
            request.account_id, requests.page_size(request.page_size), request.page_token or None
        )
        return ledger_pb2.ListEventsResponse(events=[convert.event(e) for e in events], next_page_token=cursor or "")

    @streaming
    async def WatchEvents(
        self, request: ledger_pb2.WatchEventsRequest, context: Ctx
    ) -> AsyncIterator[ledger_pb2.WatchEventsResponse]:
        principal = await self.auth.principal(context)
        validation.require_id(request.account_id, "account_id")
        principal.require(Action.READ, await self.ctx.catalog.account(request.account_id))
        async with self.ctx.bus.subscribe(lambda c: c == "events" or c.startswith("apikey:")) as changes:
            _, seq = await self.ctx.db.events_after([request.account_id], -1)
            while True:
                events, seq = await self.ctx.db.events_after([request.account_id], seq)
                for item in events:
                    yield ledger_pb2.WatchEventsResponse(event=convert.event(item))
                await changes.get()
                # The key may have been revoked since: a watch lasts only as long as its key.
                await self.auth.principal(context)

    @unary
    async def GetUsage(self, request: ledger_pb2.GetUsageRequest, context: Ctx) -> ledger_pb2.GetUsageResponse:
        principal = await self.auth.principal(context)
        validation.require_id(request.account_id, "account_id")
        balance_types = [convert.balance_type(request.balance_type)] if request.balance_type else list(BalanceType)
        groups = requests.usage_groups(request.group_by)
        since, until = requests.time_range(
            request.start_time,
            request.HasField("start_time"),
            request.end_time,
            request.HasField("end_time"),
            round(self.ctx.now() * 1_000_000),
        )
        principal.require(Action.READ, await self.ctx.catalog.account(request.account_id))
        rows = await self.ledger.usage(request.account_id, balance_types, since, until, groups)
        if not groups and not rows:
            rows = [((), UsageTotals())]  # no group: always the one total
        return ledger_pb2.GetUsageResponse(rows=[convert.usage_row(groups, key, totals) for key, totals in rows])


class AccountServicer:
    def __init__(self, ctx: Context, auth: Authenticator, accounts: Accounts) -> None:
        self.ctx, self.auth, self.accounts = ctx, auth, accounts

    @unary
    async def CreateAgency(
        self, request: account_pb2.CreateAgencyRequest, context: Ctx
    ) -> account_pb2.CreateAgencyResponse:
        principal = await self.auth.principal(context)
        principal.require(Action.PLATFORM)
        defaults = self.ctx.settings
        platform = defaults.platform_rates

        def pick(name: str, default: int) -> int:
            return getattr(request, name) if request.HasField(name) else default

        rates = convert.rate_card(
            {**platform.voice, **request.voice_rates},
            pick("default_voice_micros_per_minute", platform.default_voice),
            {**platform.sms, **request.sms_rates},
            pick("default_sms_micros_per_segment", platform.default_sms),
        )
        agency = Account(
            account_id=validation.require_id(request.agency_id, "agency_id"),
            kind=AccountKind.AGENCY,
            agency_id=request.agency_id,
            display_name=validation.optional_text(request.display_name, "display_name"),
            anchor_day=validation.anchor_day(request.period_anchor_day, "period_anchor_day"),
            free_voice_micros=validation.require_amount(
                pick("free_voice_micros", defaults.platform_free_voice_micros), "free_voice_micros"
            ),
            free_sms_micros=validation.require_amount(
                pick("free_sms_micros", defaults.platform_free_sms_micros), "free_sms_micros"
            ),
            platform_rates=rates,
        )
        return account_pb2.CreateAgencyResponse(account=convert.account(await self.accounts.create_agency(agency)))

    def _plan(self, message: account_pb2.Plan | account_pb2.CreatePlanRequest) -> Plan:
        return Plan(
            agency_id=validation.require_id(message.agency_id, "agency_id"),
            plan_id=validation.require_id(message.plan_id, "plan_id"),
            free_voice_micros=validation.require_amount(message.free_voice_micros, "free_voice_micros"),
            free_sms_micros=validation.require_amount(message.free_sms_micros, "free_sms_micros"),
            rates=convert.rate_card(
                dict(message.voice_rates),
                message.default_voice_micros_per_minute,
                dict(message.sms_rates),
                message.default_sms_micros_per_segment,
            ),
            usage_limit_micros=validation.require_amount(message.usage_limit_micros, "usage_limit_micros"),
            max_concurrent_sessions=message.max_concurrent_sessions,
        )

    @unary
    async def CreatePlan(self, request: account_pb2.CreatePlanRequest, context: Ctx) -> account_pb2.CreatePlanResponse:
        principal = await self.auth.principal(context)
        plan = self._plan(request)
        principal.require(Action.MANAGE, agency_id=plan.agency_id)
        return account_pb2.CreatePlanResponse(plan=convert.plan(await self.accounts.create_plan(plan)))

    @unary
    async def UpdatePlan(self, request: account_pb2.UpdatePlanRequest, context: Ctx) -> account_pb2.UpdatePlanResponse:
        principal = await self.auth.principal(context)
        changes = self._plan(request.plan)
        principal.require(Action.MANAGE, agency_id=changes.agency_id)
        plan = await self.accounts.update_plan(changes, list(request.update_mask.paths))
        return account_pb2.UpdatePlanResponse(plan=convert.plan(plan))

    @unary
    async def GetPlan(self, request: account_pb2.GetPlanRequest, context: Ctx) -> account_pb2.GetPlanResponse:
        principal = await self.auth.principal(context)
        validation.require_id(request.agency_id, "agency_id")
        validation.require_id(request.plan_id, "plan_id")
        principal.require(Action.MANAGE, agency_id=request.agency_id)
        return account_pb2.GetPlanResponse(
            plan=convert.plan(await self.accounts.get_plan(request.agency_id, request.plan_id))
        )

    @unary
    async def CreateClient(
        self, request: account_pb2.CreateClientRequest, context: Ctx
    ) -> account_pb2.CreateClientResponse:
        principal = await self.auth.principal(context)
        client = Account(
            account_id=validation.require_id(request.client_id, "client_id"),
            kind=AccountKind.CLIENT,
            agency_id=validation.require_id(request.agency_id, "agency_id"),
            display_name=validation.optional_text(request.display_name, "display_name"),
            plan_id=validation.require_id(request.plan_id, "plan_id"),
            billing_mode=_enum(
                request.billing_mode,
                BillingMode,
                "billing_mode",
                "BILLING_MODE_REBILLING or BILLING_MODE_AGENCY_PAID",
            ),
            anchor_day=validation.anchor_day(request.period_anchor_day, "period_anchor_day"),
        )
        principal.require(Action.MANAGE, agency_id=client.agency_id)
        return account_pb2.CreateClientResponse(account=convert.account(await self.accounts.create_client(client)))

    async def _managed(self, account_id: str, context: Ctx, agency_action: Action = Action.MANAGE) -> Account:
        principal = await self.auth.principal(context)
        validation.require_id(account_id, "account_id")
        account = await self.ctx.catalog.account(account_id)
        principal.require(agency_action if account.is_agency else Action.MANAGE, account)
        return account

    @unary
    async def UpdateSubscription(
        self, request: account_pb2.UpdateSubscriptionRequest, context: Ctx
    ) -> account_pb2.UpdateSubscriptionResponse:
        # An agency's subscriptions are its contract with the platform: only the platform changes them.
        await self._managed(request.account_id, context, agency_action=Action.PLATFORM)
        account = await self.accounts.update_subscription(
            request.account_id,
            request.inbound_active if request.HasField("inbound_active") else None,
            request.outbound_active if request.HasField("outbound_active") else None,
        )
        return account_pb2.UpdateSubscriptionResponse(account=convert.account(account))

    @unary
    async def SetAutoRefill(
        self, request: account_pb2.SetAutoRefillRequest, context: Ctx
    ) -> account_pb2.SetAutoRefillResponse:
        await self._managed(request.account_id, context)
        refill = request.auto_refill
        settings = RefillSettings(
            enabled=refill.enabled,
            threshold_micros=validation.require_amount(refill.threshold_micros, "auto_refill.threshold_micros"),
            amount_micros=validation.require_amount(refill.amount_micros, "auto_refill.amount_micros"),
            target_balance_micros=validation.require_amount(
                refill.target_balance_micros, "auto_refill.target_balance_micros"
            ),
            max_per_period=refill.max_refills_per_period,
        )
        if settings.enabled and not (settings.amount_micros or settings.target_balance_micros):
            raise InvalidArgument("an enabled auto-refill needs amount_micros or target_balance_micros", "auto_refill")
        account = await self.accounts.set_balance_settings(
            request.account_id, convert.balance_type(request.balance_type), refill=settings
        )
        return account_pb2.SetAutoRefillResponse(account=convert.account(account))

    @unary
    async def SetLowBalanceWarning(
        self, request: account_pb2.SetLowBalanceWarningRequest, context: Ctx
    ) -> account_pb2.SetLowBalanceWarningResponse:
        await self._managed(request.account_id, context)
        account = await self.accounts.set_balance_settings(
            request.account_id,
            convert.balance_type(request.balance_type),
            low_balance_threshold_micros=validation.require_amount(request.threshold_micros, "threshold_micros"),
        )
        return account_pb2.SetLowBalanceWarningResponse(account=convert.account(account))

    @unary
    async def GetAccount(self, request: account_pb2.GetAccountRequest, context: Ctx) -> account_pb2.GetAccountResponse:
        principal = await self.auth.principal(context)
        validation.require_id(request.account_id, "account_id")
        account = await self.ctx.catalog.account(request.account_id)
        principal.require(Action.READ, account)
        return account_pb2.GetAccountResponse(account=convert.account(account))

    @unary
    async def CreateApiKey(
        self, request: account_pb2.CreateApiKeyRequest, context: Ctx
    ) -> account_pb2.CreateApiKeyResponse:
        principal = await self.auth.principal(context)
        role = _enum(request.role, Role, "role", "a ROLE_* value")
        description = validation.optional_text(request.description, "description")
        if role is Role.PLATFORM_ADMIN:
            principal.require(Action.PLATFORM)
        else:
            validation.require_id(request.account_id, "account_id")
            principal.require(Action.MANAGE, await self.ctx.catalog.account(request.account_id))
        key, secret = await self.accounts.create_api_key(role, request.account_id, description)
        return account_pb2.CreateApiKeyResponse(key_id=key.key_id, secret=secret, api_key=convert.api_key(key))

    @unary
    async def RevokeApiKey(
        self, request: account_pb2.RevokeApiKeyRequest, context: Ctx
    ) -> account_pb2.RevokeApiKeyResponse:
        principal = await self.auth.principal(context)
        key_id = validation.require_text(request.key_id, "key_id", 64)
        key = await self.ctx.db.get_api_key(key_id)
        if key is not None and key.account_id:
            principal.require(Action.MANAGE, await self.ctx.catalog.account(key.account_id))
        else:
            principal.require(Action.PLATFORM)
        revoked = await self.accounts.revoke_api_key(key_id)
        self.auth.forget(key_id)
        return account_pb2.RevokeApiKeyResponse(api_key=convert.api_key(revoked))

    @unary
    async def ListApiKeys(
        self, request: account_pb2.ListApiKeysRequest, context: Ctx
    ) -> account_pb2.ListApiKeysResponse:
        principal = await self.auth.principal(context)
        account_id = request.account_id or None
        if account_id is None and principal.role is not Role.PLATFORM_ADMIN:
            account_id = principal.account_id
        if account_id is None:
            principal.require(Action.PLATFORM)
        else:
            validation.require_id(account_id, "account_id")
            principal.require(Action.MANAGE, await self.ctx.catalog.account(account_id))
        keys = await self.accounts.list_api_keys(account_id)
        return account_pb2.ListApiKeysResponse(api_keys=[convert.api_key(k) for k in keys])

    @unary
    async def ListAccounts(
        self, request: account_pb2.ListAccountsRequest, context: Ctx
    ) -> account_pb2.ListAccountsResponse:
        principal = await self.auth.principal(context)
        size, after = requests.page_size(request.page_size), requests.id_page_token(request.page_token)
        agency_id = self._agency_of(request.agency_id, principal)
        if agency_id is None:
            principal.require(Action.PLATFORM)
        else:
            principal.require(Action.MANAGE, agency_id=agency_id)
        accounts, cursor = await self.accounts.list_accounts(agency_id, size, after)
        return account_pb2.ListAccountsResponse(
            accounts=[convert.account(a) for a in accounts], next_page_token=cursor or ""
        )

    @unary
    async def ListPlans(self, request: account_pb2.ListPlansRequest, context: Ctx) -> account_pb2.ListPlansResponse:
        principal = await self.auth.principal(context)
        size, after = requests.page_size(request.page_size), requests.id_page_token(request.page_token)
        agency_id = self._agency_of(request.agency_id, principal)
        if agency_id is None:
            raise InvalidArgument("agency_id is required", "agency_id")
        principal.require(Action.MANAGE, agency_id=agency_id)
        plans, cursor = await self.accounts.list_plans(agency_id, size, after)
        return account_pb2.ListPlansResponse(plans=[convert.plan(p) for p in plans], next_page_token=cursor or "")

    @staticmethod
    def _agency_of(agency_id: str, principal: Principal) -> str | None:
        """The agency a list request names; empty names the key's own (none for a platform admin)."""
        if agency_id:
            return validation.require_id(agency_id, "agency_id")
        return None if principal.role is Role.PLATFORM_ADMIN else principal.account_id


def _deny_reason_label(value: int) -> str:
    return deny_reason_name(value) if value else "none"
