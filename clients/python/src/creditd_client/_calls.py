"""Every unary call of the API as data: which method, which request, retryable or not, and how
to turn the response into what the client returns. The sync and asyncio clients run them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from creditd_client import enums
from creditd_client.enums import EnumArg
from creditd_client.types import Authorization, Balances, TopupResult
from creditd_client.v1 import account_pb2, ledger_pb2, metering_pb2

T = TypeVar("T")
Service = Literal["metering", "ledger", "accounts"]


@dataclass(frozen=True)
class Call(Generic[T]):
    service: Service
    method: str
    request: Message
    convert: Callable[[Any], T]
    retry: bool = False  # safe to repeat on UNAVAILABLE


def _same(response: Any) -> Any:
    return response


def _account(response: Any) -> account_pb2.Account:
    account: account_pb2.Account = response.account
    return account


def _plan(response: Any) -> account_pb2.Plan:
    plan: account_pb2.Plan = response.plan
    return plan


# -- metering and ledger -------------------------------------------------------------------


def authorize(
    session_id: str,
    client_id: str,
    direction: EnumArg,
    provider: str,
    channel: EnumArg,
    destination_country: str,
    quantity: int,
) -> Call[Authorization]:
    request = metering_pb2.AuthorizeRequest(
        session_id=session_id,
        client_id=client_id,
        channel=enums.channel(channel),  # type: ignore[arg-type]
        direction=enums.direction(direction),  # type: ignore[arg-type]
        provider=provider,
        destination_country=destination_country,
        quantity=quantity,
    )
    return Call("metering", "Authorize", request, Authorization.from_proto, retry=True)


def topup(
    account_id: str,
    amount_micros: int,
    idempotency_key: str,
    balance_type: EnumArg,
    kind: EnumArg,
    external_ref: str,
) -> Call[TopupResult]:
    request = ledger_pb2.TopupRequest(
        account_id=account_id,
        balance_type=enums.balance_type(balance_type),  # type: ignore[arg-type]
        amount_micros=amount_micros,
        kind=enums.topup_kind(kind),  # type: ignore[arg-type]
        idempotency_key=idempotency_key,
        external_ref=external_ref,
    )
    return Call("ledger", "Topup", request, TopupResult.from_proto, retry=True)


def get_balance(account_id: str) -> Call[Balances]:
    return Call(
        "ledger", "GetBalance", ledger_pb2.GetBalanceRequest(account_id=account_id), Balances.from_proto, retry=True
    )


def list_ledger_entries(
    account_id: str, balance_type: EnumArg | None, page_size: int, page_token: str
) -> Call[ledger_pb2.ListLedgerEntriesResponse]:
    request = ledger_pb2.ListLedgerEntriesRequest(
        account_id=account_id,
        balance_type=enums.balance_type(balance_type) if balance_type is not None else 0,  # type: ignore[arg-type]
        page_size=page_size,
        page_token=page_token,
    )
    return Call("ledger", "ListLedgerEntries", request, _same, retry=True)


def list_events(account_id: str, page_size: int, page_token: str) -> Call[ledger_pb2.ListEventsResponse]:
    request = ledger_pb2.ListEventsRequest(account_id=account_id, page_size=page_size, page_token=page_token)
    return Call("ledger", "ListEvents", request, _same, retry=True)


def get_usage(
    account_id: str,
    start: datetime | None,
    end: datetime | None,
    balance_type: EnumArg | None,
    group_by: Iterable[EnumArg],
) -> Call[list[ledger_pb2.UsageRow]]:
    request = ledger_pb2.GetUsageRequest(
        account_id=account_id,
        balance_type=enums.balance_type(balance_type) if balance_type is not None else 0,  # type: ignore[arg-type]
        group_by=[enums.usage_group(g) for g in group_by],  # type: ignore[misc]
    )
    for field, value in (("start_time", start), ("end_time", end)):
        if value is not None:
            if value.tzinfo is None:
                raise ValueError(f"{field}: give an aware datetime (UTC), not a naive one")
            stamp = Timestamp()
            stamp.FromDatetime(value)
            getattr(request, field).CopyFrom(stamp)

    def rows(response: Any) -> list[ledger_pb2.UsageRow]:
        return list(response.rows)

    return Call("ledger", "GetUsage", request, rows, retry=True)


# -- accounts --------------------------------------------------------------------------------


def list_accounts(agency_id: str, page_size: int, page_token: str) -> Call[account_pb2.ListAccountsResponse]:
    request = account_pb2.ListAccountsRequest(agency_id=agency_id, page_size=page_size, page_token=page_token)
    return Call("accounts", "ListAccounts", request, _same, retry=True)


def list_plans(agency_id: str, page_size: int, page_token: str) -> Call[account_pb2.ListPlansResponse]:
    request = account_pb2.ListPlansRequest(agency_id=agency_id, page_size=page_size, page_token=page_token)
    return Call("accounts", "ListPlans", request, _same, retry=True)


def create_agency(
    agency_id: str,
    display_name: str,
    free_voice_micros: int | None,
    free_sms_micros: int | None,
    voice_rates: Mapping[str, int] | None,
    default_voice_micros_per_minute: int | None,
    sms_rates: Mapping[str, int] | None,
    default_sms_micros_per_segment: int | None,
    period_anchor_day: int,
) -> Call[account_pb2.Account]:
    request = account_pb2.CreateAgencyRequest(
        agency_id=agency_id,
        display_name=display_name,
        voice_rates=dict(voice_rates or {}),
        sms_rates=dict(sms_rates or {}),
        period_anchor_day=period_anchor_day,
    )
    optional = {
        "free_voice_micros": free_voice_micros,
        "free_sms_micros": free_sms_micros,
        "default_voice_micros_per_minute": default_voice_micros_per_minute,
        "default_sms_micros_per_segment": default_sms_micros_per_segment,
    }
    for name, value in optional.items():
        if value is not None:  # unset takes the platform default; 0 is a real override
            setattr(request, name, value)
    return Call("accounts", "CreateAgency", request, _account)


PLAN_FIELDS = (
    "free_voice_micros",
    "free_sms_micros",
    "voice_rates",
    "default_voice_micros_per_minute",
    "sms_rates",
    "default_sms_micros_per_segment",
    "usage_limit_micros",
    "max_concurrent_sessions",
)


def create_plan(agency_id: str, plan_id: str, fields: Mapping[str, Any]) -> Call[account_pb2.Plan]:
    request = account_pb2.CreatePlanRequest(agency_id=agency_id, plan_id=plan_id, **_plan_fields(fields))
    return Call("accounts", "CreatePlan", request, _plan)


def update_plan(agency_id: str, plan_id: str, changes: Mapping[str, Any]) -> Call[account_pb2.Plan]:
    """Changes only the fields given (not None); they make the update_mask."""
    fields = {name: value for name, value in changes.items() if value is not None}
    if not fields:
        raise ValueError("update_plan needs at least one field to change")
    plan = account_pb2.Plan(agency_id=agency_id, plan_id=plan_id, **_plan_fields(fields))
    request = account_pb2.UpdatePlanRequest(plan=plan, update_mask=FieldMask(paths=sorted(fields)))
    return Call("accounts", "UpdatePlan", request, _plan)


def _plan_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(fields) - set(PLAN_FIELDS)
    if unknown:
        raise TypeError(f"unknown plan fields: {sorted(unknown)}")
    return {name: dict(value) if name.endswith("_rates") else value for name, value in fields.items()}


def get_plan(agency_id: str, plan_id: str) -> Call[account_pb2.Plan]:
    request = account_pb2.GetPlanRequest(agency_id=agency_id, plan_id=plan_id)
    return Call("accounts", "GetPlan", request, _plan, retry=True)


def create_client(
    client_id: str, agency_id: str, plan_id: str, billing_mode: EnumArg, display_name: str, period_anchor_day: int
) -> Call[account_pb2.Account]:
    request = account_pb2.CreateClientRequest(
        client_id=client_id,
        agency_id=agency_id,
        plan_id=plan_id,
        billing_mode=enums.billing_mode(billing_mode),  # type: ignore[arg-type]
        display_name=display_name,
        period_anchor_day=period_anchor_day,
    )
    return Call("accounts", "CreateClient", request, _account)


def update_subscription(
    account_id: str, inbound_active: bool | None, outbound_active: bool | None
) -> Call[account_pb2.Account]:
    request = account_pb2.UpdateSubscriptionRequest(account_id=account_id)
    if inbound_active is not None:
        request.inbound_active = inbound_active
    if outbound_active is not None:
        request.outbound_active = outbound_active
    return Call("accounts", "UpdateSubscription", request, _account)


def set_auto_refill(
    account_id: str,
    balance_type: EnumArg,
    enabled: bool,
    threshold_micros: int,
    amount_micros: int,
    target_balance_micros: int,
    max_refills_per_period: int,
) -> Call[account_pb2.Account]:
    request = account_pb2.SetAutoRefillRequest(
        account_id=account_id,
        balance_type=enums.balance_type(balance_type),  # type: ignore[arg-type]
        auto_refill=account_pb2.AutoRefill(
            enabled=enabled,
            threshold_micros=threshold_micros,
            amount_micros=amount_micros,
            target_balance_micros=target_balance_micros,
            max_refills_per_period=max_refills_per_period,
        ),
    )
    return Call("accounts", "SetAutoRefill", request, _account)


def set_low_balance_warning(account_id: str, balance_type: EnumArg, threshold_micros: int) -> Call[account_pb2.Account]:
    request = account_pb2.SetLowBalanceWarningRequest(
        account_id=account_id,
        balance_type=enums.balance_type(balance_type),  # type: ignore[arg-type]
        threshold_micros=threshold_micros,
    )
    return Call("accounts", "SetLowBalanceWarning", request, _account)


def get_account(account_id: str) -> Call[account_pb2.Account]:
    return Call("accounts", "GetAccount", account_pb2.GetAccountRequest(account_id=account_id), _account, retry=True)


def create_api_key(role: EnumArg, account_id: str, description: str) -> Call[account_pb2.CreateApiKeyResponse]:
    request = account_pb2.CreateApiKeyRequest(
        role=enums.role(role),  # type: ignore[arg-type]
        account_id=account_id,
        description=description,
    )
    return Call("accounts", "CreateApiKey", request, _same)


def revoke_api_key(key_id: str) -> Call[account_pb2.ApiKey]:
    def key(response: Any) -> account_pb2.ApiKey:
        api_key: account_pb2.ApiKey = response.api_key
        return api_key

    return Call("accounts", "RevokeApiKey", account_pb2.RevokeApiKeyRequest(key_id=key_id), key)


def list_api_keys(account_id: str) -> Call[list[account_pb2.ApiKey]]:
    def keys(response: Any) -> list[account_pb2.ApiKey]:
        return list(response.api_keys)

    request = account_pb2.ListApiKeysRequest(account_id=account_id)
    return Call("accounts", "ListApiKeys", request, keys, retry=True)
