"""Between creditd.v1 messages and the domain's values."""

from __future__ import annotations

import time

from creditd_client.v1 import account_pb2, common_pb2, ledger_pb2, metering_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from creditd.domain.accounts import Account, AccountKind, ApiKey, BillingMode, Plan, Role
from creditd.domain.rates import RateCard
from creditd.domain.records import BalanceType, DenyReason, EntryKind, EventRecord, EventType, LedgerRecord, TopupKind
from creditd.domain.usage import DAY_SECONDS, UsageGroup, UsageTotals
from creditd.domain.wallet import WalletState
from creditd.engine import messages
from creditd.engine.validation import require_rate, sms_rates, voice_rates
from creditd.errors import InvalidArgument

# The domain's enums (and the ints the engine passes) as the generated enum types. The
# numbers are the same; each table says so once, typed, and knows no other value.
ACCOUNT_KINDS: dict[int, common_pb2.AccountKind] = {
    AccountKind.AGENCY: common_pb2.ACCOUNT_KIND_AGENCY,
    AccountKind.CLIENT: common_pb2.ACCOUNT_KIND_CLIENT,
}
BILLING_MODES: dict[int, common_pb2.BillingMode] = {
    BillingMode.NONE: common_pb2.BILLING_MODE_UNSPECIFIED,
    BillingMode.REBILLING: common_pb2.BILLING_MODE_REBILLING,
    BillingMode.AGENCY_PAID: common_pb2.BILLING_MODE_AGENCY_PAID,
}
BALANCE_TYPES: dict[int, common_pb2.BalanceType] = {
    BalanceType.VOICE: common_pb2.BALANCE_TYPE_VOICE,
    BalanceType.SMS: common_pb2.BALANCE_TYPE_SMS,
}
DENY_REASONS: dict[int, common_pb2.DenyReason] = {
    DenyReason.NONE: common_pb2.DENY_REASON_UNSPECIFIED,
    DenyReason.CLIENT_CREDITS_EXHAUSTED: common_pb2.DENY_REASON_CLIENT_CREDITS_EXHAUSTED,
    DenyReason.AGENCY_CREDITS_EXHAUSTED: common_pb2.DENY_REASON_AGENCY_CREDITS_EXHAUSTED,
    DenyReason.USAGE_LIMIT_REACHED: common_pb2.DENY_REASON_USAGE_LIMIT_REACHED,
    DenyReason.SUBSCRIPTION_INACTIVE: common_pb2.DENY_REASON_SUBSCRIPTION_INACTIVE,
    DenyReason.CONCURRENCY_LIMIT_REACHED: common_pb2.DENY_REASON_CONCURRENCY_LIMIT_REACHED,
    DenyReason.SESSION_ABANDONED: common_pb2.DENY_REASON_SESSION_ABANDONED,
    DenyReason.SERVICE_UNAVAILABLE: common_pb2.DENY_REASON_SERVICE_UNAVAILABLE,
}
ENTRY_KINDS: dict[int, ledger_pb2.LedgerEntryKind] = {
    EntryKind.TOPUP: ledger_pb2.LEDGER_ENTRY_KIND_TOPUP,
    EntryKind.VOICE_USAGE: ledger_pb2.LEDGER_ENTRY_KIND_VOICE_USAGE,
    EntryKind.SMS_USAGE: ledger_pb2.LEDGER_ENTRY_KIND_SMS_USAGE,
    EntryKind.FREE_EXPIRY: ledger_pb2.LEDGER_ENTRY_KIND_FREE_EXPIRY,
    EntryKind.FREE_ALLOWANCE: ledger_pb2.LEDGER_ENTRY_KIND_FREE_ALLOWANCE,
}
TOPUP_KINDS: dict[int, ledger_pb2.TopupKind] = {
    0: ledger_pb2.TOPUP_KIND_UNSPECIFIED,  # an entry that is no top-up
    TopupKind.PURCHASE: ledger_pb2.TOPUP_KIND_PURCHASE,
    TopupKind.GRANT: ledger_pb2.TOPUP_KIND_GRANT,
    TopupKind.REFUND: ledger_pb2.TOPUP_KIND_REFUND,
    TopupKind.AUTO_REFILL: ledger_pb2.TOPUP_KIND_AUTO_REFILL,
}
EVENT_TYPES: dict[int, ledger_pb2.EventType] = {
    EventType.LOW_BALANCE: ledger_pb2.EVENT_TYPE_LOW_BALANCE,
    EventType.REFILL_REQUESTED: ledger_pb2.EVENT_TYPE_REFILL_REQUESTED,
    EventType.LIMIT_REACHED: ledger_pb2.EVENT_TYPE_LIMIT_REACHED,
    EventType.CUTOFF: ledger_pb2.EVENT_TYPE_CUTOFF,
    EventType.TOPUP_APPLIED: ledger_pb2.EVENT_TYPE_TOPUP_APPLIED,
    EventType.FREE_CREDITS_EXPIRED: ledger_pb2.EVENT_TYPE_FREE_CREDITS_EXPIRED,
}
ROLES: dict[int, account_pb2.Role] = {
    Role.PLATFORM_ADMIN: account_pb2.ROLE_PLATFORM_ADMIN,
    Role.AGENCY_ADMIN: account_pb2.ROLE_AGENCY_ADMIN,
    Role.WORKER: account_pb2.ROLE_WORKER,
    Role.READER: account_pb2.ROLE_READER,
}


def deny_reason(value: int) -> common_pb2.DenyReason:
    return DENY_REASONS[value]


def timestamp(epoch: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMicroseconds(round(epoch * 1_000_000))  # the precision the database keeps
    return stamp


def balance_type(value: int, field: str = "balance_type") -> BalanceType:
    try:
        return BalanceType(value)
    except ValueError:
        raise InvalidArgument(f"{field} must be BALANCE_TYPE_VOICE or BALANCE_TYPE_SMS", field) from None


def balance(wallet: WalletState) -> common_pb2.Balance:
    return common_pb2.Balance(
        free_micros=wallet.free_micros,
        purchased_micros=wallet.purchased_micros,
        reserved_micros=wallet.reserved_micros,
        available_micros=wallet.available(),
        period_used_micros=wallet.used_micros,
        usage_limit_micros=wallet.config.usage_limit_micros,
        period_start=timestamp(wallet.period_start),
        period_end=timestamp(wallet.period_end),
        has_wallet=wallet.config.has_wallet,
    )


def rate_card(
    voice: dict[str, int], default_voice: int, sms: dict[str, int], default_sms: int, prefix: str = ""
) -> RateCard:
    return RateCard(
        voice=voice_rates(voice, f"{prefix}voice_rates"),
        default_voice=require_rate(default_voice, f"{prefix}default_voice_micros_per_minute"),
        sms=sms_rates(sms, f"{prefix}sms_rates"),
        default_sms=require_rate(default_sms, f"{prefix}default_sms_micros_per_segment"),
    )


def rates_message(card: RateCard) -> account_pb2.Rates:
    return account_pb2.Rates(
        voice_rates=dict(card.voice),
        default_voice_micros_per_minute=card.default_voice,
        sms_rates=dict(card.sms),
        default_sms_micros_per_segment=card.default_sms,
    )


def account(value: Account) -> account_pb2.Account:
    message = account_pb2.Account(
        account_id=value.account_id,
        kind=ACCOUNT_KINDS[value.kind],
        display_name=value.display_name,
        agency_id=value.agency_id,
        plan_id=value.plan_id,
        billing_mode=BILLING_MODES[value.billing_mode],
        inbound_active=value.inbound_active,
        outbound_active=value.outbound_active,
        period_anchor_day=value.anchor_day,
        created_at=timestamp(value.created_at),
    )
    if value.is_agency:
        message.free_voice_micros = value.free_voice_micros
        message.free_sms_micros = value.free_sms_micros
        if value.platform_rates is not None:
            message.platform_rates.CopyFrom(rates_message(value.platform_rates))
    for kind, settings in sorted(value.settings.items()):
        refill = settings.refill
        message.balance_settings.append(
            account_pb2.BalanceSettings(
                balance_type=BALANCE_TYPES[kind],
                auto_refill=account_pb2.AutoRefill(
                    enabled=refill.enabled,
                    threshold_micros=refill.threshold_micros,
                    amount_micros=refill.amount_micros,
                    target_balance_micros=refill.target_balance_micros,
                    max_refills_per_period=refill.max_per_period,
                ),
                low_balance_threshold_micros=settings.low_balance_threshold_micros,
            )
        )
    return message


def plan(value: Plan) -> account_pb2.Plan:
    return account_pb2.Plan(
        agency_id=value.agency_id,
        plan_id=value.plan_id,
        free_voice_micros=value.free_voice_micros,
        free_sms_micros=value.free_sms_micros,
        voice_rates=dict(value.rates.voice),
        default_voice_micros_per_minute=value.rates.default_voice,
        sms_rates=dict(value.rates.sms),
        default_sms_micros_per_segment=value.rates.default_sms,
        usage_limit_micros=value.usage_limit_micros,
        max_concurrent_sessions=value.max_concurrent_sessions,
    )


def ledger_entry(entry: LedgerRecord) -> ledger_pb2.LedgerEntry:
    return ledger_pb2.LedgerEntry(
        entry_id=entry.entry_id,
        account_id=entry.account_id,
        balance_type=BALANCE_TYPES[entry.balance_type],
        kind=ENTRY_KINDS[entry.kind],
        amount_micros=entry.amount_micros,
        free_micros=entry.free_micros,
        purchased_micros=entry.purchased_micros,
        usage_micros=entry.usage_micros,
        topup_kind=TOPUP_KINDS[entry.topup_kind or 0],
        session_id=entry.session_id,
        message_id=entry.message_id,
        idempotency_key=entry.idempotency_key,
        external_ref=entry.external_ref,
        # the record's quantity: seconds of a voice balance, segments of an SMS one
        seconds=0 if entry.balance_type == BalanceType.SMS else entry.seconds,
        segments=entry.seconds if entry.balance_type == BalanceType.SMS else 0,
        created_at=timestamp(entry.created_at),
        client_id=entry.client_id,
        provider=entry.provider,
        destination_country=entry.destination_country,
    )


def event(value: EventRecord) -> ledger_pb2.Event:
    return ledger_pb2.Event(
        event_id=value.event_id,
        account_id=value.account_id,
        type=EVENT_TYPES[value.type],
        balance_type=BALANCE_TYPES[value.balance_type],
        amount_micros=value.amount_micros,
        idempotency_key=value.idempotency_key,
        session_id=value.session_id,
        reason=DENY_REASONS[value.reason],
        created_at=timestamp(value.created_at),
        attributes=value.attributes,
    )


def api_key(key: ApiKey) -> account_pb2.ApiKey:
    return account_pb2.ApiKey(
        key_id=key.key_id,
        role=ROLES[key.role],
        account_id=key.account_id,
        description=key.description,
        created_at=timestamp(key.created_at),
        revoked=key.revoked_at is not None,
    )


def stream_request(request: metering_pb2.StreamUsageRequest) -> messages.Request:
    which = request.WhichOneof("msg")
    if which == "start":
        start = request.start
        return messages.Start(start.session_id, start.client_id, start.channel, start.direction)
    if which == "usage":
        return messages.Usage(request.usage.seconds_used)
    if which == "sms":
        sms = request.sms
        return messages.Sms(sms.message_id, sms.destination_country, sms.segments)
    if which == "end":
        return messages.End(request.end.seconds_used)
    raise InvalidArgument("a stream message must set one of start, usage, sms or end", "msg")


def stream_response(message: messages.Message) -> metering_pb2.StreamUsageResponse:
    match message:
        case messages.GrantMsg():
            return metering_pb2.StreamUsageResponse(
                grant=metering_pb2.Grant(
                    granted_seconds=message.granted_seconds, expires_at=timestamp(message.expires_at)
                )
            )
        case messages.WarningMsg():
            return metering_pb2.StreamUsageResponse(
                warning=metering_pb2.LowCreditWarning(remaining_seconds=message.remaining_seconds)
            )
        case messages.SmsResultMsg():
            return metering_pb2.StreamUsageResponse(
                sms_result=metering_pb2.SmsResult(
                    message_id=message.message_id,
                    allowed=message.allowed,
                    deny_reason=DENY_REASONS[message.deny_reason],
                    charged_micros=message.charged_micros,
                )
            )
        case messages.CutoffMsg():
            return metering_pb2.StreamUsageResponse(
                cutoff=metering_pb2.Cutoff(reason=DENY_REASONS[message.reason], billed_seconds=message.billed_seconds)
            )
        case messages.SummaryMsg():
            return metering_pb2.StreamUsageResponse(
                summary=metering_pb2.SessionSummary(
                    billed_seconds=message.billed_seconds,
                    client_charged_micros=message.client_charged_micros,
                    agency_charged_micros=message.agency_charged_micros,
                    messages_sent=message.messages_sent,
                    messages_denied=message.messages_denied,
                )
            )
    raise TypeError(message)


def usage_row(groups: list[UsageGroup], key: tuple[object, ...], totals: UsageTotals) -> ledger_pb2.UsageRow:
    """One row of GetUsage: the values of `groups` (in key order) and the group's totals."""
    row = ledger_pb2.UsageRow(
        voice_seconds=totals.voice_seconds,
        sms_segments=totals.sms_segments,
        sms_messages=totals.sms_messages,
        charged_micros=totals.charged_micros,
        free_micros=totals.free_micros,
        purchased_micros=totals.purchased_micros,
        usage_micros=totals.usage_micros,
    )
    for group, value in zip(groups, key, strict=True):
        if group is UsageGroup.CHANNEL:
            row.channel = int(value)  # type: ignore[call-overload]  # a usage entry's channel is its balance type
        elif group is UsageGroup.DAY:
            row.day = time.strftime("%Y-%m-%d", time.gmtime(int(value) * DAY_SECONDS))  # type: ignore[call-overload]
        else:
            setattr(row, _USAGE_ROW_FIELDS[group], str(value))
    return row


_USAGE_ROW_FIELDS = {
    UsageGroup.PROVIDER: "provider",
    UsageGroup.DESTINATION_COUNTRY: "destination_country",
    UsageGroup.CLIENT: "client_id",
}
