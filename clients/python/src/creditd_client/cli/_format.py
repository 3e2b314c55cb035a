"""Output of creditctl: aligned tables with amounts in credits, or JSON for scripts."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from creditd_client.credits import format_credits


def credits(micros: int) -> str:
    return format_credits(micros)


def limit(micros: int) -> str:
    return format_credits(micros) if micros else "none"


def when(value: datetime | Timestamp | None) -> str:
    if isinstance(value, Timestamp):
        if value.seconds == 0 and value.nanos == 0:
            return "-"
        value = value.ToDatetime()
    if value is None:
        return "-"
    return value.strftime("%Y-%m-%d %H:%M:%S")


def rates(values: Mapping[str, int]) -> str:
    return ", ".join(f"{key}={format_credits(micros)}" for key, micros in sorted(values.items())) or "-"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], right: Iterable[int] = ()) -> str:
    """Columns padded to their widest cell; the columns in `right` (numbers) aligned right."""
    text_rows = [[str(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    right_set = set(right)

    def line(cells: Sequence[str]) -> str:
        padded = [cell.rjust(widths[i]) if i in right_set else cell.ljust(widths[i]) for i, cell in enumerate(cells)]
        return "  ".join(padded).rstrip()

    return "\n".join([line(list(headers)), *(line(row) for row in text_rows)])


class Stream:
    """Rows printed one at a time, as they come: columns have fixed minimum widths."""

    def __init__(self, headers: Sequence[str], widths: Sequence[int], right: Iterable[int] = ()) -> None:
        self.widths = [max(len(h), w) for h, w in zip(headers, widths, strict=True)]
        self.right = set(right)
        self.header = self.row(headers)

    def row(self, cells: Sequence[object]) -> str:
        padded = [
            str(cell).rjust(self.widths[i]) if i in self.right else str(cell).ljust(self.widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(padded).rstrip()


def fields(pairs: Sequence[tuple[str, object]]) -> str:
    """A vertical table: one `name  value` line per field."""
    width = max(len(name) for name, _ in pairs)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in pairs)


# -- JSON ----------------------------------------------------------------------------------------


def to_json(value: Any) -> str:
    return json.dumps(plain(value), sort_keys=False)


def plain(value: Any) -> Any:
    """JSON-ready data: micro-credit amounts stay exact integers, times are ISO 8601 UTC."""
    if isinstance(value, Message):
        return message_dict(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def message_dict(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[field.name] = {k: plain(v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_scalar(field, v) for v in value]
        else:
            out[field.name] = _scalar(field, value, message)
    return out


def _scalar(field: Any, value: Any, parent: Message | None = None) -> Any:
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name if value in field.enum_type.values_by_number else value
    if isinstance(value, Timestamp):
        present = parent is None or parent.HasField(field.name)
        return value.ToJsonString() if present and (value.seconds or value.nanos) else None
    if isinstance(value, Message):
        return message_dict(value)
    return value
