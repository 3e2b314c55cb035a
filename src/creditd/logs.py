"""Structured logs: one JSON object per line, with the request and session of the call.

Every line has `time` (UTC, ISO 8601 with milliseconds), `level`, `logger` and `message`;
`request_id` and `session_id` are added when the line is written while serving a call (the
RPC interceptor sets them, see creditd.telemetry), and `exception` when there is one.

Secrets never reach a log line: the formatter removes API keys (`cdk_…`), bearer tokens,
the value of `authorization` metadata and any secret registered with `add_secret` (the
bootstrap admin token) from the message, the exception and every extra field.
"""

from __future__ import annotations

import contextvars
import datetime
import itertools
import json
import logging
import re
import secrets
import sys
from collections.abc import Iterator
from typing import Any, TextIO

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("creditd_request_id", default=None)
session_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("creditd_session_id", default=None)

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("json", "text")
REDACTED = "[redacted]"

_PROCESS = secrets.token_hex(3)
_COUNTER = itertools.count(1)
_PATTERNS = [
    # creditd API keys and bootstrap tokens: cdk_<id>_<secret>, cdk_bootstrap_<secret>
    re.compile(r"cdk_[A-Za-z0-9_\-]+"),
    # "Bearer <token>" wherever it is written
    re.compile(r"(?i)(bearer\s+)[^\s'\",;)\]}]+"),
    # authorization metadata as a pair, a mapping or a header: ('authorization', 'x'), authorization: x
    re.compile(r"(?i)(authorization['\"]?\s*[:=,]\s*['\"]?)[^'\"\s,;)\]}]+"),
]
_secrets: set[str] = set()
MAX_LOGGED_ID = 64
# What a caller's request id may be made of: enough for UUIDs, trace ids and "<service>:<n>",
# nothing that could forge a log line or hide a secret in look-alike characters.
_REQUEST_ID = re.compile(rf"^[A-Za-z0-9._:/+=-]{{1,{MAX_LOGGED_ID}}}$")
# Fields of a LogRecord that are not extras.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def new_request_id() -> str:
    """A request id unique in this process and unlikely to repeat across replicas."""
    return f"{_PROCESS}-{next(_COUNTER):x}"


def caller_request_id(value: str) -> str | None:
    """The caller's `x-request-id` as it may be logged, or None to make one instead.

    Only short ids of a safe character set are kept, and anything shaped like a creditd key
    (a key pasted into the wrong header) is redacted.
    """
    if not _REQUEST_ID.match(value):
        return None
    return redact(value)


def add_secret(secret: str) -> None:
    """Never write this string to a log (e.g. the bootstrap admin token)."""
    if len(secret) >= 8:
        _secrets.add(secret)


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, text)
    return text


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        request = request_id.get()
        if request is not None:
            entry["request_id"] = redact(request)
        session = session_id.get()
        if session is not None:
            entry["session_id"] = redact(session)
        for key, value in _extras(record):
            entry.setdefault(key, _clean(value))
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = redact(record.exc_text)
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The same content for people reading a terminal, secrets removed as well."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        pairs = (("request", request_id.get()), ("session", session_id.get()))
        ids = [f"{name}={value}" for name, value in pairs if value]
        return redact(f"{text} [{' '.join(ids)}]" if ids else text)


def _extras(record: logging.LogRecord) -> Iterator[tuple[str, Any]]:
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_"):
            yield key, value


# Libraries too talkative for creditd's own levels: aiosqlite logs every statement at debug
# (thousands of lines a minute), Alembic every migration context at each embedded start.
QUIET_LOGGERS = {"aiosqlite": logging.INFO, "alembic": logging.WARNING}


def setup(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> logging.Handler:
    """Send every log line to `stream` (stderr) in `fmt`; returns the handler installed."""
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name, quiet in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(root.level, quiet))
    return handler
