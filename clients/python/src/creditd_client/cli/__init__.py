"""creditctl: administer creditd from a shell.

    creditctl agency create acme --name "Acme Reception"
    creditctl plan create acme standard --default-voice-rate 1 --default-sms-rate 0.166
    creditctl client create dental --agency acme --plan standard
    creditctl topup dental 12 --key payment-123
    creditctl balance dental --watch
    creditctl usage acme --month 2026-11 --by client --csv
    creditctl low-balance set dental --type voice --threshold 2
    eval "$(creditctl completion bash)"

Amounts are credits ("12", "0.166"), converted exactly to micro-credits. Tables by default,
`--json` for scripts. Exit codes: 0 ok, 1 creditd refused or failed (reason on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from creditd_client import __version__, enums
from creditd_client.cli import _commands as commands
from creditd_client.cli import _completion as completion
from creditd_client.cli import _usage
from creditd_client.client import Client
from creditd_client.credits import to_micros
from creditd_client.errors import CreditdError, Unavailable
from creditd_client.options import DEFAULT_ADDRESS
from creditd_client.v1 import account_pb2, common_pb2, ledger_pb2

PROG = "creditctl"


def credits(text: str) -> int:
    try:
        micros = to_micros(text)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if micros < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: amounts are not negative")
    return micros


def rate(text: str) -> tuple[str, int]:
    """`name=credits`, e.g. elevenlabs=1.2 or GB=0.4."""
    name, sep, amount = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=CREDITS")
    return name.strip(), credits(amount)


def on_off(text: str) -> bool:
    value = text.strip().lower()
    if value in ("on", "true", "yes", "active", "1"):
        return True
    if value in ("off", "false", "no", "suspended", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: expected on or off")


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def _globals(parser: argparse.ArgumentParser, suppress: bool) -> None:
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--address",
        default=default(os.environ.get("CREDITD_ADDRESS", DEFAULT_ADDRESS)),
        help=f"host:port of creditd (env CREDITD_ADDRESS, default {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--token",
        default=default(os.environ.get("CREDITD_TOKEN", "")),
        help="API key sent as 'authorization: Bearer' (env CREDITD_TOKEN)",
    )
    parser.add_argument("--json", action="store_true", default=default(False), help="print JSON for scripts")
    parser.add_argument("--timeout", type=float, default=default(5.0), help="deadline of each call in seconds")


def _types(parser: argparse.ArgumentParser, required: bool = False, what: str = "balance") -> None:
    choices = enums.short_names(common_pb2.BalanceType, "BALANCE_TYPE_")
    parser.add_argument("--type", choices=choices, required=required, help=f"{what} type")


def _plan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--free-voice", type=credits, metavar="CREDITS", help="free voice credits per period")
    parser.add_argument("--free-sms", type=credits, metavar="CREDITS", help="free SMS credits per period")
    parser.add_argument(
        "--voice-rate", type=rate, action="append", metavar="PROVIDER=CREDITS", help="credits/minute for a provider"
    )
    parser.add_argument("--default-voice-rate", type=credits, metavar="CREDITS", help="credits per minute")
    parser.add_argument(
        "--sms-rate", type=rate, action="append", metavar="COUNTRY=CREDITS", help="credits/segment for a country"
    )
    parser.add_argument("--default-sms-rate", type=credits, metavar="CREDITS", help="credits per segment")
    parser.add_argument("--usage-limit", type=credits, metavar="CREDITS", help="per period and balance; 0 = none")
    parser.add_argument("--max-sessions", type=int, metavar="N", help="concurrent live sessions; 0 = none")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Administer creditd.", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _globals(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _globals(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def group(name: str, help_text: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        return sub.add_parser(name, help=help_text).add_subparsers(dest="action", required=True, metavar="ACTION")

    def command(
        parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str, handler: commands.Handler, text: str
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, parents=[common], help=text, description=text)
        p.set_defaults(handler=handler)
        return p

    agency = group("agency", "agencies (platform admins)")
    p = command(agency, "create", commands.agency_create, "create an agency")
    p.add_argument("agency_id")
    p.add_argument("--name", default="", help="display name")
    p.add_argument("--free-voice", type=credits, metavar="CREDITS", help="override the platform's free voice credits")
    p.add_argument("--free-sms", type=credits, metavar="CREDITS", help="override the platform's free SMS credits")
    p.add_argument("--voice-rate", type=rate, action="append", metavar="PROVIDER=CREDITS", help="platform price/min")
    p.add_argument("--default-voice-rate", type=credits, metavar="CREDITS", help="platform price per minute")
    p.add_argument("--sms-rate", type=rate, action="append", metavar="COUNTRY=CREDITS", help="platform price/segment")
    p.add_argument("--default-sms-rate", type=credits, metavar="CREDITS", help="platform price per segment")
    p.add_argument("--anchor-day", type=int, default=0, help="day of month (1-28) periods start")

    plan = group("plan", "plans of an agency")
    for name, handler, text in (
        ("create", commands.plan_create, "create a plan"),
        ("update", commands.plan_update, "change the fields given; clients see it from their next slice"),
        ("get", commands.plan_get, "show a plan"),
    ):
        p = command(plan, name, handler, text)
        p.add_argument("agency_id")
        p.add_argument("plan_id")
        if name != "get":
            _plan_options(p)

    client = group("client", "clients of an agency")
    p = command(client, "create", commands.client_create, "create a client on a plan")
    p.add_argument("client_id")
    p.add_argument("--agency", required=True)
    p.add_argument("--plan", required=True)
    p.add_argument("--mode", default="rebilling", choices=enums.short_names(common_pb2.BillingMode, "BILLING_MODE_"))
    p.add_argument("--name", default="", help="display name")
    p.add_argument("--anchor-day", type=int, default=0, help="day of month (1-28) periods start")

    account = group("account", "any account")
    p = command(account, "get", commands.account_get, "show an agency or a client")
    p.add_argument("account_id")

    subscription = group("subscription", "inbound and outbound subscriptions")
    p = command(subscription, "set", commands.subscription_set, "activate or suspend (suspending cuts live calls)")
    p.add_argument("account_id")
    p.add_argument("--inbound", type=on_off, metavar="on|off")
    p.add_argument("--outbound", type=on_off, metavar="on|off")

    refill = group("refill", "auto-refill of a balance")
    p = command(refill, "set", commands.refill_set, "configure auto-refill")
    p.add_argument("account_id")
    _types(p, required=True)
    p.add_argument("--threshold", type=credits, metavar="CREDITS", help="refill when available falls below this")
    p.add_argument("--amount", type=credits, metavar="CREDITS", help="credits to buy per refill")
    p.add_argument("--target", type=credits, metavar="CREDITS", help="buy what brings the balance back to this")
    p.add_argument("--max-refills", type=int, default=1, metavar="N", help="per period (default 1)")
    p.add_argument("--off", action="store_true", help="turn auto-refill off")

    p = sub.add_parser("topup", parents=[common], help="credit an account (once per --key)")
    p.set_defaults(handler=commands.topup)
    p.add_argument("account_id")
    p.add_argument("amount", type=credits, help="credits, e.g. 12 or 0.166")
    p.add_argument("--key", required=True, help="idempotency key: the same key never credits twice")
    p.add_argument("--type", default="voice", choices=enums.short_names(common_pb2.BalanceType, "BALANCE_TYPE_"))
    p.add_argument("--kind", default="purchase", choices=enums.short_names(ledger_pb2.TopupKind, "TOPUP_KIND_"))
    p.add_argument("--ref", default="", help="external reference (payment id, invoice)")

    p = sub.add_parser("balance", parents=[common], help="voice and SMS balances of an account")
    p.set_defaults(handler=commands.balance)
    p.add_argument("account_id")
    p.add_argument("--watch", action="store_true", help="print a line per balance per change (Ctrl-C stops)")
    p.add_argument("--count", type=positive, default=None, help="with --watch: stop after N updates")

    p = sub.add_parser("ledger", parents=[common], help="ledger entries of an account, newest first")
    p.set_defaults(handler=commands.ledger)
    p.add_argument("account_id")
    _types(p)
    p.add_argument("--limit", type=positive, default=50, help="at most this many entries (default 50)")

    p = sub.add_parser("events", parents=[common], help="events of an account, newest first")
    p.set_defaults(handler=commands.events)
    p.add_argument("account_id")
    p.add_argument("--limit", type=positive, default=50, help="at most this many events (default 50)")
    p.add_argument("--watch", action="store_true", help="print events as they happen (Ctrl-C stops)")
    p.add_argument("--count", type=positive, default=None, help="with --watch: stop after N events")

    _usage.add_commands(sub, common)

    key = group("key", "API keys")
    p = command(key, "create", commands.key_create, "create a key (its secret is shown once)")
    p.add_argument("role", choices=enums.short_names(account_pb2.Role, "ROLE_"))
    p.add_argument("account_id", nargs="?", default="", help="the agency or account it is scoped to")
    p.add_argument("--description", default="")
    p = command(key, "revoke", commands.key_revoke, "revoke a key")
    p.add_argument("key_id")
    p = command(key, "list", commands.key_list, "list keys")
    p.add_argument("account_id", nargs="?", default="")
    _add_low_balance(group, command)
    _add_completion(sub)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


def _add_low_balance(group: Any, command: Any) -> None:
    low = group("low-balance", "low-balance warnings (LOW_BALANCE events)")
    p = command(low, "set", commands.low_balance_set, "raise LOW_BALANCE once each time available falls below")
    p.add_argument("account_id")
    _types(p, required=True)
    p.add_argument("--threshold", type=credits, metavar="CREDITS", help="warn below this many credits")
    p.add_argument("--off", action="store_true", help="no warning")


def _add_completion(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("completion", help='print a shell completion script: eval "$(creditctl completion bash)"')
    p.add_argument("shell", choices=completion.SHELLS, help="zsh: run `autoload -U bashcompinit && bashcompinit` first")


def describe(error: CreditdError, address: str) -> str:
    code = error.code.name if error.code is not None else "ERROR"
    text = f"{PROG}: {code}"
    if error.reason != code:
        text += f" {error.reason}"
    text += f": {error.message}" if error.message else ""
    if isinstance(error, Unavailable):
        text += f" (creditd at {address})"
    details = ", ".join(f"{k}={v}" for k, v in sorted(error.metadata.items()))
    return text + (f" [{details}]" if details else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command == "completion":  # needs no server
        print(completion.bash_script(parser), end="")
        return 0
    if args.timeout <= 0:
        print(f"{PROG}: error: --timeout must be positive", file=sys.stderr)
        return 2
    try:
        with Client(args.address, args.token, timeout=args.timeout) as client:
            args.handler(client, args)
    except (commands.UsageError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except CreditdError as exc:
        print(describe(exc, args.address), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
