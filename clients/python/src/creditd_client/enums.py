"""Enum arguments: a short name ("voice", "agency_paid"), the full proto name, or the number."""

from __future__ import annotations

from typing import Any

from creditd_client.v1 import account_pb2, common_pb2, ledger_pb2

EnumArg = str | int


def _parse(wrapper: Any, prefix: str, value: EnumArg, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a name or a number, not a bool")
    if isinstance(value, int):
        if value not in wrapper.values():
            raise ValueError(f"unknown {what}: {value}")
        return value
    name = value.strip().upper().replace("-", "_")
    if not name.startswith(prefix):
        name = prefix + name
    if name == prefix + "UNSPECIFIED" or name not in set(wrapper.keys()):
        choices = ", ".join(short_names(wrapper, prefix))
        raise ValueError(f"unknown {what} {value!r}; one of {choices}")
    number: int = wrapper.Value(name)
    return number


def short_names(wrapper: Any, prefix: str) -> list[str]:
    """The names a user may type, e.g. ["voice", "sms"]."""
    return [name[len(prefix) :].lower() for name in list(wrapper.keys()) if not name.endswith("_UNSPECIFIED")]


def short_name(wrapper: Any, prefix: str, number: int) -> str:
    """The short lower-case name of a value ("voice"), or its number if unknown."""
    try:
        name: str = wrapper.Name(number)
    except ValueError:
        return str(number)
    return name[len(prefix) :].lower() if name.startswith(prefix) else name.lower()


def balance_type(value: EnumArg) -> int:
    return _parse(common_pb2.BalanceType, "BALANCE_TYPE_", value, "balance type")


def channel(value: EnumArg) -> int:
    return _parse(common_pb2.Channel, "CHANNEL_", value, "channel")


def direction(value: EnumArg) -> int:
    return _parse(common_pb2.Direction, "DIRECTION_", value, "direction")


def billing_mode(value: EnumArg) -> int:
    return _parse(common_pb2.BillingMode, "BILLING_MODE_", value, "billing mode")


def topup_kind(value: EnumArg) -> int:
    return _parse(ledger_pb2.TopupKind, "TOPUP_KIND_", value, "top-up kind")


def role(value: EnumArg) -> int:
    return _parse(account_pb2.Role, "ROLE_", value, "role")


def usage_group(value: EnumArg) -> int:
    """A GetUsage group: "channel", "provider", "destination_country" (or "country"), "client", "day"."""
    if isinstance(value, str) and value.strip().lower() == "country":
        value = "destination_country"
    return _parse(ledger_pb2.UsageGroup, "USAGE_GROUP_", value, "usage group")
