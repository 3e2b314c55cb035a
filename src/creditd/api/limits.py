"""The limits of every request field, checked at the API edge before anything else runs.

Each creditd.v1 request type gets a list of checks built once from its descriptor: every
enum is one of its declared values, every integer within its range, every string, map and
repeated field within its length, and page tokens are cursors the database can use. A
field out of its limits is INVALID_ARGUMENT naming the field, with a message that repeats
at most a short prefix of the value. What a valid value means (an id's format, an amount
above zero, a plan that exists) is checked by the handlers and the engine, as before.

The checks of one request cost a few microseconds: attribute reads and comparisons.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf import descriptor as pb_descriptor
from google.protobuf.message import Message

from creditd.domain.money import MAX_AMOUNT_MICROS, MAX_RATE_MICROS, MAX_SEGMENTS, MAX_SESSION_SECONDS
from creditd.engine.validation import MAX_ID_LENGTH, MAX_KEY_LENGTH, MAX_NAME_LENGTH
from creditd.errors import InvalidArgument

FD = pb_descriptor.FieldDescriptor
Check = Callable[[Any], None]

MAX_PAGE_SIZE = 1000
MAX_RATES = 300  # entries of one voice_rates or sms_rates map (there are about 250 countries)
MAX_MASK_PATHS = 32  # paths of an update_mask
MAX_REPEATED = 100  # any other repeated field or map
MAX_COUNT = 1_000_000  # counters: concurrent sessions, refills per period
MAX_INTEGER = 2**53 - 1  # any other integer: every number creditd keeps is exact in a double
MAX_COUNTRY_LENGTH = 8  # an ISO 3166-1 alpha-2 code, with room for stray spaces
MAX_ANCHOR_DAY = 28

# Strings by field name; any other string may have MAX_KEY_LENGTH characters.
_TEXT = {
    "account_id": MAX_ID_LENGTH,
    "agency_id": MAX_ID_LENGTH,
    "client_id": MAX_ID_LENGTH,
    "plan_id": MAX_ID_LENGTH,
    "key_id": MAX_NAME_LENGTH,
    "provider": MAX_NAME_LENGTH,
    "destination_country": MAX_COUNTRY_LENGTH,
    "google.protobuf.FieldMask.paths": MAX_NAME_LENGTH,
}
# Integers by field name (or full name); any other integer is 0..MAX_INTEGER.
_RANGES = {
    "amount_micros": (0, MAX_AMOUNT_MICROS),
    "free_voice_micros": (0, MAX_AMOUNT_MICROS),
    "free_sms_micros": (0, MAX_AMOUNT_MICROS),
    "usage_limit_micros": (0, MAX_AMOUNT_MICROS),
    "threshold_micros": (0, MAX_AMOUNT_MICROS),
    "target_balance_micros": (0, MAX_AMOUNT_MICROS),
    "default_voice_micros_per_minute": (0, MAX_RATE_MICROS),
    "default_sms_micros_per_segment": (0, MAX_RATE_MICROS),
    "seconds_used": (0, MAX_SESSION_SECONDS),
    "segments": (0, MAX_SEGMENTS),
    "quantity": (0, MAX_SEGMENTS),
    "page_size": (0, MAX_PAGE_SIZE),
    "period_anchor_day": (0, MAX_ANCHOR_DAY),
    "max_concurrent_sessions": (0, MAX_COUNT),
    "max_refills_per_period": (0, MAX_COUNT),
    "google.protobuf.Timestamp.seconds": (0, 253_402_300_799),  # up to 9999-12-31
    "google.protobuf.Timestamp.nanos": (0, 999_999_999),
}
# Maps by field name: (most entries, longest key, range of a value).
_MAPS = {
    "voice_rates": (MAX_RATES, MAX_NAME_LENGTH, (0, MAX_RATE_MICROS)),
    "sms_rates": (MAX_RATES, MAX_COUNTRY_LENGTH, (0, MAX_RATE_MICROS)),
}
_REPEATED = {"google.protobuf.FieldMask.paths": MAX_MASK_PATHS}

_INTEGERS = frozenset(
    {
        FD.TYPE_INT32,
        FD.TYPE_INT64,
        FD.TYPE_UINT32,
        FD.TYPE_UINT64,
        FD.TYPE_SINT32,
        FD.TYPE_SINT64,
        FD.TYPE_FIXED32,
        FD.TYPE_FIXED64,
        FD.TYPE_SFIXED32,
        FD.TYPE_SFIXED64,
    }
)
_checks: dict[type[Message], tuple[Check, ...]] = {}


def check(message: Message) -> None:
    """Raise InvalidArgument for the first field of `message` outside its limits."""
    checks = _checks.get(type(message))
    if checks is None:
        checks = _checks[type(message)] = _message_checks(message.DESCRIPTOR, "")
    for one in checks:
        one(message)


def _rule(table: dict[str, Any], field: FD, default: Any) -> Any:
    return table.get(field.full_name, table.get(field.name, default))


def _message_checks(descriptor: Any, prefix: str) -> tuple[Check, ...]:
    if prefix.count(".") > 8:
        raise TypeError(f"{descriptor.full_name} nests too deep (a recursive message?) to be checked")
    checks: list[Check] = []
    lengths: list[tuple[str, int, str]] = []
    ranges: list[tuple[str, int, int, str]] = []
    members: list[tuple[str, frozenset[int], str, str]] = []
    for field in descriptor.fields:
        path = f"{prefix}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            checks.append(_map(field.name, field.message_type, path))
        elif field.is_repeated:
            checks.append(_repeated(field, path))
        elif field.type == FD.TYPE_MESSAGE:
            checks.append(_nested(field, path))
        elif field.enum_type is not None:
            members.append((field.name, *_members(field.enum_type), path))
        elif field.type == FD.TYPE_STRING:
            lengths.append((field.name, _rule(_TEXT, field, MAX_KEY_LENGTH), path))
        elif field.type in _INTEGERS:
            ranges.append((field.name, *_rule(_RANGES, field, (0, MAX_INTEGER)), path))
        else:
            checks.append(_field(field.name, _value_check(field, path)))
    if lengths or ranges or members:
        checks.insert(0, _scalars(tuple(lengths), tuple(ranges), tuple(members)))
    return tuple(checks)


def _scalars(
    lengths: tuple[tuple[str, int, str], ...],
    ranges: tuple[tuple[str, int, int, str], ...],
    members: tuple[tuple[str, frozenset[int], str, str], ...],
) -> Check:
    """The strings, integers and enums of a message in one call: the hot path's checks."""

    def one(message: Any) -> None:
        for name, longest, path in lengths:
            if len(getattr(message, name)) > longest:
                raise _too_long(path, longest, len(getattr(message, name)))
        for name, low, high, path in ranges:
            value = getattr(message, name)
            if not low <= value <= high:
                raise _out_of_range(path, low, high, value)
        for name, allowed, names, path in members:
            value = getattr(message, name)
            if value not in allowed:
                raise _not_a_member(path, names, value)

    return one


def _field(name: str, value_check: Check) -> Check:
    def one(message: Any) -> None:
        value_check(getattr(message, name))

    return one


def _every(checks: tuple[Check, ...]) -> Check:
    def one(message: Any) -> None:
        for each in checks:
            each(message)

    return one


def _value_check(field: FD, path: str) -> Check:
    """The check of one value of `field`: a scalar, an element of a repeated field, a map value."""
    if field.type == FD.TYPE_MESSAGE:
        return _every(_message_checks(field.message_type, f"{path}."))
    if field.enum_type is not None:
        return _enum(field.enum_type, path)
    if field.type == FD.TYPE_STRING:
        return _text(_rule(_TEXT, field, MAX_KEY_LENGTH), path)
    if field.type == FD.TYPE_BYTES:
        return _text(MAX_KEY_LENGTH, path, unit="bytes")
    if field.type == FD.TYPE_BOOL:
        return _nothing
    if field.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return _finite(path)
    low, high = _rule(_RANGES, field, (0, MAX_INTEGER))
    return _range(low, high, path)


def _nested(field: FD, path: str) -> Check:
    name, inner = field.name, _value_check(field, path)

    def one(message: Any) -> None:
        if message.HasField(name):
            inner(getattr(message, name))

    return one


def _repeated(field: FD, path: str) -> Check:
    name, element = field.name, _value_check(field, path)
    most = _rule(_REPEATED, field, MAX_REPEATED)

    def one(message: Any) -> None:
        values = getattr(message, name)
        if len(values) > most:
            raise InvalidArgument(f"{path} may have at most {most} entries, not {len(values)}", path)
        for value in values:
            element(value)

    return one


def _map(name: str, entry_type: pb_descriptor.Descriptor, path: str) -> Check:
    key, value = entry_type.fields_by_name["key"], entry_type.fields_by_name["value"]
    if name in _MAPS:
        most, longest_key, (low, high) = _MAPS[name]
        key_check, value_check = _text(longest_key, path, f"{path} keys"), _range(low, high, path)
    else:
        most, key_check, value_check = MAX_REPEATED, _value_check(key, path), _value_check(value, path)

    def one(message: Any) -> None:
        entries = getattr(message, name)
        if len(entries) > most:
            raise InvalidArgument(f"{path} may have at most {most} entries, not {len(entries)}", path)
        for key, value in entries.items():
            key_check(key)
            value_check(value)

    return one


# -- checks of one value ------------------------------------------------------------------


def _nothing(value: Any) -> None:
    return None


def _text(longest: int, path: str, label: str = "", unit: str = "characters") -> Check:
    def one(value: str | bytes) -> None:
        if len(value) > longest:
            raise _too_long(path, longest, len(value), unit, label)

    return one


def _range(low: int, high: int, path: str) -> Check:
    def one(value: int) -> None:
        if not low <= value <= high:
            raise _out_of_range(path, low, high, value)

    return one


def _members(enum: pb_descriptor.EnumDescriptor) -> tuple[frozenset[int], str]:
    """The numbers an enum field may carry, and the names to tell a caller (UNSPECIFIED aside)."""
    return frozenset(v.number for v in enum.values), ", ".join(v.name for v in enum.values if v.number)


def _enum(enum: pb_descriptor.EnumDescriptor, path: str) -> Check:
    allowed, names = _members(enum)

    def one(value: int) -> None:
        if value not in allowed:
            raise _not_a_member(path, names, value)

    return one


def _finite(path: str) -> Check:
    def one(value: float) -> None:
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidArgument(f"{path} must be a finite number", path)

    return one


# -- the errors -----------------------------------------------------------------------------


def _too_long(path: str, longest: int, size: int, unit: str = "characters", label: str = "") -> InvalidArgument:
    return InvalidArgument(f"{label or path} may have at most {longest} {unit}, not {size}", path)


def _out_of_range(path: str, low: int, high: int, value: int) -> InvalidArgument:
    return InvalidArgument(f"{path} must be {low}-{high}", path, value=value)


def _not_a_member(path: str, names: str, value: int) -> InvalidArgument:
    return InvalidArgument(f"{path} must be one of {names}", path, value=value)
