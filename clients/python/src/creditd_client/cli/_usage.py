"""creditctl clients, plans and usage: an agency's books, as tables, JSON or CSV.

creditctl clients acme
creditctl plans acme
creditctl usage acme --month 2026-11 --by client --csv > november.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import re
from collections.abc import Sequence
from datetime import UTC, datetime

from creditd_client import enums
from creditd_client.cli import _format as fmt
from creditd_client.cli._commands import emit
from creditd_client.client import Client
from creditd_client.v1 import account_pb2, common_pb2, ledger_pb2

GROUPS = ("channel", "provider", "country", "client", "day")
# The key column of each group in the output, and its field in a UsageRow.
_KEYS = {
    "channel": ("CHANNEL", "channel"),
    "provider": ("PROVIDER", "provider"),
    "country": ("COUNTRY", "destination_country"),
    "client": ("CLIENT", "client_id"),
    "day": ("DAY", "day"),
}
_TOTALS = ("VOICE SECONDS", "SMS SEGMENTS", "SMS MESSAGES", "CHARGED", "FREE", "PURCHASED", "USAGE")


def month(text: str) -> tuple[datetime, datetime]:
    """`YYYY-MM` as [its first midnight, the next month's) in UTC."""
    if not re.fullmatch(r"\d{4}-\d{2}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected YYYY-MM, e.g. 2026-11")
    year, number = int(text[:4]), int(text[5:])
    if not 1 <= number <= 12:
        raise argparse.ArgumentTypeError(f"{text!r}: no such month")
    start = datetime(year, number, 1, tzinfo=UTC)
    end = datetime(year + number // 12, number % 12 + 1, 1, tzinfo=UTC)
    return start, end


def groups(text: str) -> list[str]:
    """`provider` or `client,provider`."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in GROUPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: group by any of {', '.join(GROUPS)}")
    return names


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("clients", parents=[common], help="an agency's clients (no agency: the key's own)")
    p.set_defaults(handler=clients)
    p.add_argument("agency_id", nargs="?", default="", help="platform admins: omit to list the agencies")

    p = sub.add_parser("plans", parents=[common], help="an agency's plans (no agency: the key's own)")
    p.set_defaults(handler=plans)
    p.add_argument("agency_id", nargs="?", default="")

    p = sub.add_parser(
        "usage", parents=[common], help="what an account consumed in a month, grouped (amounts in credits)"
    )
    p.set_defaults(handler=usage)
    p.add_argument("account_id", help="a client, or an agency (--by client: its usage per client)")
    p.add_argument("--month", type=month, metavar="YYYY-MM", help="a calendar month in UTC (default: this one)")
    p.add_argument(
        "--by", type=groups, action="append", default=[], metavar="GROUP[,GROUP]", help=f"any of {', '.join(GROUPS)}"
    )
    p.add_argument("--type", choices=enums.short_names(common_pb2.BalanceType, "BALANCE_TYPE_"), help="one balance")
    p.add_argument("--csv", action="store_true", help="print CSV (header, then one line per group)")


# -- clients and plans -----------------------------------------------------------------------


def render_accounts(accounts: Sequence[account_pb2.Account]) -> str:
    headers = ("ACCOUNT", "KIND", "NAME", "AGENCY", "PLAN", "BILLING", "INBOUND", "OUTBOUND", "CREATED")
    rows = [
        [
            a.account_id,
            enums.short_name(common_pb2.AccountKind, "ACCOUNT_KIND_", a.kind),
            a.display_name or "-",
            a.agency_id,
            a.plan_id or "-",
            enums.short_name(common_pb2.BillingMode, "BILLING_MODE_", a.billing_mode) if a.billing_mode else "-",
            "active" if a.inbound_active else "suspended",
            "active" if a.outbound_active else "suspended",
            fmt.when(a.created_at),
        ]
        for a in accounts
    ]
    return fmt.table(headers, rows)


def render_plans(found: Sequence[account_pb2.Plan]) -> str:
    headers = (
        "PLAN", "FREE VOICE", "FREE SMS", "VOICE/MIN", "VOICE RATES", "SMS/SEGMENT", "SMS RATES", "LIMIT", "SESSIONS",
    )  # fmt: skip
    rows = [
        [
            p.plan_id,
            fmt.credits(p.free_voice_micros),
            fmt.credits(p.free_sms_micros),
            fmt.credits(p.default_voice_micros_per_minute),
            fmt.rates(p.voice_rates),
            fmt.credits(p.default_sms_micros_per_segment),
            fmt.rates(p.sms_rates),
            fmt.limit(p.usage_limit_micros),
            p.max_concurrent_sessions or "none",
        ]
        for p in found
    ]
    return fmt.table(headers, rows, right=[1, 2, 3, 5, 7, 8])


def clients(client: Client, args: argparse.Namespace) -> None:
    emit(args, list(client.list_accounts(args.agency_id, page_size=1000)), render_accounts)


def plans(client: Client, args: argparse.Namespace) -> None:
    emit(args, list(client.list_plans(args.agency_id, page_size=1000)), render_plans)


# -- usage -----------------------------------------------------------------------------------


def usage_table(by: Sequence[str], rows: Sequence[ledger_pb2.UsageRow]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells: the group keys, then the totals (amounts in exact credits)."""
    headers = [_KEYS[name][0] for name in by] + list(_TOTALS)
    cells = []
    for row in rows:
        keys = [
            enums.short_name(common_pb2.Channel, "CHANNEL_", row.channel)
            if name == "channel"
            else getattr(row, _KEYS[name][1]) or "-"
            for name in by
        ]
        amounts = (row.charged_micros, row.free_micros, row.purchased_micros, row.usage_micros)
        counts = [str(row.voice_seconds), str(row.sms_segments), str(row.sms_messages)]
        cells.append(keys + counts + [fmt.credits(micros) for micros in amounts])
    return headers, cells


def usage(client: Client, args: argparse.Namespace) -> None:
    by = list(dict.fromkeys(name for names in args.by for name in names))  # in order, once each
    start, end = args.month or month(datetime.now(UTC).strftime("%Y-%m"))
    rows = client.get_usage(args.account_id, start=start, end=end, balance_type=args.type, group_by=by)
    if args.csv:
        headers, cells = usage_table(by, rows)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([h.lower().replace(" ", "_") for h in headers])
        writer.writerows([[c if c != "-" else "" for c in row] for row in cells])
        print(out.getvalue(), end="", flush=True)
        return

    def render(found: list[ledger_pb2.UsageRow]) -> str:
        headers, cells = usage_table(by, found)
        title = f"{args.account_id}: usage {start:%Y-%m-%d} to {end:%Y-%m-%d} (UTC, end excluded), amounts in credits"
        return title + "\n" + fmt.table(headers, cells, right=range(len(by), len(headers)))

    emit(args, rows, render)
