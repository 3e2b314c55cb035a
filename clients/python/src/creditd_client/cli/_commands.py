"""What each creditctl subcommand does: one call, then a table or JSON."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from creditd_client import enums
from creditd_client.cli import _format as fmt
from creditd_client.client import Client
from creditd_client.types import Balances, Event, TopupResult
from creditd_client.v1 import account_pb2, common_pb2, ledger_pb2

Handler = Callable[[Client, argparse.Namespace], None]


def emit(args: argparse.Namespace, value: Any, render: Callable[[Any], str]) -> None:
    print(fmt.to_json(value) if args.json else render(value), flush=True)


def _name(wrapper: Any, prefix: str, number: int) -> str:
    return enums.short_name(wrapper, prefix, number)


# -- renderers -----------------------------------------------------------------------------------


def render_account(account: account_pb2.Account) -> str:
    rows: list[tuple[str, object]] = [
        ("account", account.account_id),
        ("kind", _name(common_pb2.AccountKind, "ACCOUNT_KIND_", account.kind)),
        ("name", account.display_name or "-"),
        ("agency", account.agency_id),
    ]
    if account.kind == common_pb2.ACCOUNT_KIND_CLIENT:
        rows += [
            ("plan", account.plan_id),
            ("billing mode", _name(common_pb2.BillingMode, "BILLING_MODE_", account.billing_mode)),
        ]
    rows += [
        ("inbound", "active" if account.inbound_active else "suspended"),
        ("outbound", "active" if account.outbound_active else "suspended"),
    ]
    if account.kind == common_pb2.ACCOUNT_KIND_AGENCY:  # a client's allowance and prices are its plan's
        r = account.platform_rates
        rows += [
            ("free voice credits", fmt.credits(account.free_voice_micros)),
            ("free sms credits", fmt.credits(account.free_sms_micros)),
            ("platform voice rates", fmt.rates(r.voice_rates)),
            ("default voice rate", f"{fmt.credits(r.default_voice_micros_per_minute)}/min"),
            ("platform sms rates", fmt.rates(r.sms_rates)),
            ("default sms rate", f"{fmt.credits(r.default_sms_micros_per_segment)}/segment"),
        ]
    rows.append(("period anchor day", account.period_anchor_day or 1))
    for settings in account.balance_settings:
        kind = _name(common_pb2.BalanceType, "BALANCE_TYPE_", settings.balance_type)
        refill = settings.auto_refill
        if refill.enabled:
            amount = (
                f"to {fmt.credits(refill.target_balance_micros)}"
                if refill.target_balance_micros
                else f"+{fmt.credits(refill.amount_micros)}"
            )
            rows.append(
                (
                    f"{kind} auto-refill",
                    f"below {fmt.credits(refill.threshold_micros)}: {amount}, "
                    f"at most {refill.max_refills_per_period}/period",
                )
            )
        if settings.low_balance_threshold_micros:
            rows.append((f"{kind} low-balance warning", f"below {fmt.credits(settings.low_balance_threshold_micros)}"))
    rows.append(("created", fmt.when(account.created_at)))
    return fmt.fields(rows)


def render_plan(plan: account_pb2.Plan) -> str:
    return fmt.fields(
        [
            ("agency", plan.agency_id),
            ("plan", plan.plan_id),
            ("free voice credits", fmt.credits(plan.free_voice_micros)),
            ("free sms credits", fmt.credits(plan.free_sms_micros)),
            ("voice rates", fmt.rates(plan.voice_rates)),
            ("default voice rate", f"{fmt.credits(plan.default_voice_micros_per_minute)}/min"),
            ("sms rates", fmt.rates(plan.sms_rates)),
            ("default sms rate", f"{fmt.credits(plan.default_sms_micros_per_segment)}/segment"),
            ("usage limit", fmt.limit(plan.usage_limit_micros)),
            ("max concurrent sessions", plan.max_concurrent_sessions or "none"),
        ]
    )


BALANCE_HEADERS = ("BALANCE", "FREE", "PURCHASED", "RESERVED", "AVAILABLE", "USED", "LIMIT", "PERIOD END")


def balance_rows(balances: Balances) -> list[list[object]]:
    rows: list[list[object]] = []
    for kind, b in (("voice", balances.voice), ("sms", balances.sms)):
        rows.append(
            [
                kind,
                fmt.credits(b.free_micros),
                fmt.credits(b.purchased_micros) if b.has_wallet else "-",
                fmt.credits(b.reserved_micros),
                fmt.credits(b.available_micros),
                fmt.credits(b.period_used_micros),
                fmt.limit(b.usage_limit_micros),
                fmt.when(b.period_end),
            ]
        )
    return rows


def render_balances(balances: Balances) -> str:
    return f"account {balances.account_id}\n" + fmt.table(BALANCE_HEADERS, balance_rows(balances), right=range(1, 7))


def render_topup(result: TopupResult) -> str:
    b = result.balance
    return fmt.fields(
        [
            ("entry", result.entry_id),
            ("available", fmt.credits(b.available_micros)),
            ("free", fmt.credits(b.free_micros)),
            ("purchased", fmt.credits(b.purchased_micros)),
        ]
    )


def render_entries(entries: list[ledger_pb2.LedgerEntry]) -> str:
    headers = ("CREATED", "TYPE", "KIND", "AMOUNT", "FREE", "PURCHASED", "USAGE", "BILLED", "REFERENCE", "ENTRY")
    rows = [
        [
            fmt.when(e.created_at),
            _name(common_pb2.BalanceType, "BALANCE_TYPE_", e.balance_type),
            _name(ledger_pb2.LedgerEntryKind, "LEDGER_ENTRY_KIND_", e.kind),
            fmt.credits(e.amount_micros),
            fmt.credits(e.free_micros),
            fmt.credits(e.purchased_micros),
            fmt.credits(e.usage_micros),
            f"{e.seconds}s" if e.seconds else (f"{e.segments} seg" if e.segments else ""),
            e.session_id or e.message_id or e.idempotency_key or "",
            e.entry_id,
        ]
        for e in entries
    ]
    return fmt.table(headers, rows, right=range(3, 8))


def _short(name: str, prefix: str) -> str:
    """ "EVENT_TYPE_TOPUP_APPLIED" -> "topup_applied"."""
    return name.removeprefix(prefix).lower()


def event_row(e: Event) -> list[object]:
    return [
        fmt.when(e.created_at),
        _short(e.type, "EVENT_TYPE_"),
        _short(e.balance_type, "BALANCE_TYPE_"),
        fmt.credits(e.amount_micros) if e.amount_micros else "",
        _short(e.reason, "DENY_REASON_"),
        e.idempotency_key or e.session_id or "",
    ]


EVENT_HEADERS = ("CREATED", "EVENT", "BALANCE", "AMOUNT", "REASON", "KEY/SESSION")


def render_events(events: list[Event]) -> str:
    return fmt.table(EVENT_HEADERS, [event_row(e) for e in events], right=[3])


def render_keys(keys: Iterable[account_pb2.ApiKey]) -> str:
    headers = ("KEY", "ROLE", "ACCOUNT", "STATUS", "CREATED", "DESCRIPTION")
    rows = [
        [
            k.key_id,
            _name(account_pb2.Role, "ROLE_", k.role),
            k.account_id or "-",
            "revoked" if k.revoked else "active",
            fmt.when(k.created_at),
            k.description,
        ]
        for k in keys
    ]
    return fmt.table(headers, rows)


# -- handlers ------------------------------------------------------------------------------------


def _rates(pairs: list[tuple[str, int]] | None) -> dict[str, int] | None:
    return dict(pairs) if pairs else None


def agency_create(client: Client, args: argparse.Namespace) -> None:
    account = client.create_agency(
        args.agency_id,
        args.name,
        free_voice_micros=args.free_voice,
        free_sms_micros=args.free_sms,
        voice_rates=_rates(args.voice_rate),
        default_voice_micros_per_minute=args.default_voice_rate,
        sms_rates=_rates(args.sms_rate),
        default_sms_micros_per_segment=args.default_sms_rate,
        period_anchor_day=args.anchor_day,
    )
    emit(args, account, render_account)


def _plan_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "free_voice_micros": args.free_voice,
        "free_sms_micros": args.free_sms,
        "voice_rates": _rates(args.voice_rate),
        "default_voice_micros_per_minute": args.default_voice_rate,
        "sms_rates": _rates(args.sms_rate),
        "default_sms_micros_per_segment": args.default_sms_rate,
        "usage_limit_micros": args.usage_limit,
        "max_concurrent_sessions": args.max_sessions,
    }


def plan_create(client: Client, args: argparse.Namespace) -> None:
    given = {name: value for name, value in _plan_fields(args).items() if value is not None}
    emit(args, client.create_plan(args.agency_id, args.plan_id, **given), render_plan)


def plan_update(client: Client, args: argparse.Namespace) -> None:
    fields = _plan_fields(args)
    if all(value is None for value in fields.values()):
        raise UsageError("plan update: give at least one field to change")
    emit(args, client.update_plan(args.agency_id, args.plan_id, **fields), render_plan)


def plan_get(client: Client, args: argparse.Namespace) -> None:
    emit(args, client.get_plan(args.agency_id, args.plan_id), render_plan)


def client_create(client: Client, args: argparse.Namespace) -> None:
    account = client.create_client(
        args.client_id,
        args.agency,
        args.plan,
        billing_mode=args.mode,
        display_name=args.name,
        period_anchor_day=args.anchor_day,
    )
    emit(args, account, render_account)


def account_get(client: Client, args: argparse.Namespace) -> None:
    emit(args, client.get_account(args.account_id), render_account)


def subscription_set(client: Client, args: argparse.Namespace) -> None:
    if args.inbound is None and args.outbound is None:
        raise UsageError("subscription set: give --inbound and/or --outbound")
    account = client.update_subscription(args.account_id, inbound_active=args.inbound, outbound_active=args.outbound)
    emit(args, account, render_account)


def refill_set(client: Client, args: argparse.Namespace) -> None:
    enabled = not args.off
    if enabled and not (args.amount or args.target):
        raise UsageError("refill set: give --amount or --target (or --off)")
    account = client.set_auto_refill(
        args.account_id,
        args.type,
        enabled=enabled,
        threshold_micros=args.threshold or 0,
        amount_micros=args.amount or 0,
        target_balance_micros=args.target or 0,
        max_refills_per_period=args.max_refills,
    )
    emit(args, account, render_account)


def low_balance_set(client: Client, args: argparse.Namespace) -> None:
    if args.off == (args.threshold is not None):
        raise UsageError("low-balance set: give --threshold CREDITS or --off")
    account = client.set_low_balance_warning(args.account_id, args.type, 0 if args.off else args.threshold)
    emit(args, account, render_account)


def topup(client: Client, args: argparse.Namespace) -> None:
    result = client.topup(
        args.account_id,
        args.amount,
        args.key,
        balance_type=args.type,
        kind=args.kind,
        external_ref=args.ref,
    )
    emit(args, result, render_topup)


def balance(client: Client, args: argparse.Namespace) -> None:
    if not args.watch:
        emit(args, client.get_balance(args.account_id), render_balances)
        return
    stream = fmt.Stream(("AT", *BALANCE_HEADERS), (19, 7, 10, 10, 10, 10, 10, 10, 19), right=range(2, 8))
    with client.watch_balance(args.account_id) as watch:
        for index, balances in enumerate(itertools.islice(watch, args.count)):
            if args.json:
                print(fmt.to_json(balances), flush=True)
                continue
            if index == 0:
                print(f"account {balances.account_id}\n{stream.header}", flush=True)
            stamp = fmt.when(datetime.now(UTC))
            for row in balance_rows(balances):
                print(stream.row([stamp, *row]), flush=True)


def ledger(client: Client, args: argparse.Namespace) -> None:
    entries = list(
        itertools.islice(
            client.list_ledger_entries(args.account_id, balance_type=args.type, page_size=min(args.limit, 1000)),
            args.limit,
        )
    )
    emit(args, entries, render_entries)


def events(client: Client, args: argparse.Namespace) -> None:
    if not args.watch:
        found = list(itertools.islice(client.list_events(args.account_id, page_size=min(args.limit, 1000)), args.limit))
        emit(args, found, render_events)
        return
    stream = fmt.Stream(EVENT_HEADERS, (19, 20, 7, 10, 26, 0), right=[3])
    with client.watch_events(args.account_id) as watch:
        if not args.json:
            print(stream.header, flush=True)
        for event in itertools.islice(watch, args.count):
            print(fmt.to_json(event) if args.json else stream.row(event_row(event)), flush=True)


def key_create(client: Client, args: argparse.Namespace) -> None:
    created = client.create_api_key(args.role, args.account_id, description=args.description)

    def render(response: account_pb2.CreateApiKeyResponse) -> str:
        text = render_keys([response.api_key])
        return f"{text}\n\nsecret (shown only now): {response.secret}"

    emit(args, created, render)


def key_revoke(client: Client, args: argparse.Namespace) -> None:
    emit(args, client.revoke_api_key(args.key_id), lambda key: render_keys([key]))


def key_list(client: Client, args: argparse.Namespace) -> None:
    emit(args, client.list_api_keys(args.account_id), render_keys)


class UsageError(Exception):
    """A command line that parses but makes no sense (exit code 2)."""
