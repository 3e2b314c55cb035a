"""Checks of the listing and usage requests; each failure is INVALID_ARGUMENT naming its field."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.timestamp_pb2 import Timestamp

from creditd.domain.usage import UsageGroup
from creditd.engine import validation
from creditd.errors import InvalidArgument

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
# What a Timestamp may hold: 0001-01-01 to 9999-12-31 (google.protobuf.Timestamp's range).
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799


def page_size(value: int) -> int:
    if value < 0 or value > MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be 0-{MAX_PAGE_SIZE}", "page_size", value=value)
    return value or DEFAULT_PAGE_SIZE


def id_page_token(value: str) -> str | None:
    """A token of an id-ordered list is the last id of the previous page."""
    if not value:
        return None
    try:
        return validation.require_id(value, "page_token")
    except InvalidArgument:
        raise InvalidArgument("malformed page_token", "page_token") from None


def usage_groups(values: Iterable[int]) -> list[UsageGroup]:
    groups: list[UsageGroup] = []
    for value in values:
        try:
            group = UsageGroup(value)
        except ValueError:
            raise InvalidArgument("group_by takes USAGE_GROUP_* values", "group_by", value=value) from None
        if group in groups:
            raise InvalidArgument("group_by names a group twice", "group_by", group=group.name)
        groups.append(group)
    return groups


def time_range(start: Timestamp, has_start: bool, end: Timestamp, has_end: bool, now_us: int) -> tuple[int, int]:
    """[start, end) in epoch microseconds; an unset start is the epoch, an unset end is now."""
    since = _micros(start, "start_time") if has_start else 0
    until = _micros(end, "end_time") if has_end else now_us
    if until <= since:
        raise InvalidArgument("end_time must be after start_time", "end_time", start_us=since, end_us=until)
    return since, until


def _micros(value: Timestamp, field: str) -> int:
    if not (_MIN_SECONDS <= value.seconds <= _MAX_SECONDS and 0 <= value.nanos < 1_000_000_000):
        raise InvalidArgument(f"{field} is not a valid timestamp", field)
    return value.ToMicroseconds()
