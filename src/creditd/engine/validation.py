"""Checks of caller input. Each failure names the field, and nothing has changed yet."""

from __future__ import annotations

import re
from collections.abc import Mapping

from creditd.domain.money import MAX_AMOUNT_MICROS, MAX_RATE_MICROS
from creditd.errors import InvalidArgument, quote

MAX_ID_LENGTH = 128  # account, agency, client and plan ids
MAX_NAME_LENGTH = 64  # voice provider names
MAX_KEY_LENGTH = 255  # caller-chosen keys and texts: session and message ids, idempotency keys, names

# Ids become parts of store keys: no braces (Redis Cluster hash tags), colons or spaces.
_ID = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._@-]{{0,{MAX_ID_LENGTH - 1}}}$")
_COUNTRY = re.compile(r"^[A-Z]{2}$")
_PROVIDER = re.compile(rf"^[a-z0-9][a-z0-9._-]{{0,{MAX_NAME_LENGTH - 1}}}$")


def require_id(value: str, field: str) -> str:
    if not _ID.match(value):
        raise InvalidArgument(
            f"{field} must be 1-{MAX_ID_LENGTH} letters, digits, '.', '_', '@' or '-', starting with a letter or digit",
            field,
        )
    return value


def require_text(value: str, field: str, max_length: int = MAX_KEY_LENGTH) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required", field)
    if len(value) > max_length or not value.isprintable():
        raise InvalidArgument(f"{field} must be printable and at most {max_length} characters", field)
    return value


def optional_text(value: str, field: str, max_length: int = MAX_KEY_LENGTH) -> str:
    return require_text(value, field, max_length) if value else value


def require_amount(value: int, field: str, *, allow_zero: bool = True, maximum: int = MAX_AMOUNT_MICROS) -> int:
    low = 0 if allow_zero else 1
    if not low <= value <= maximum:
        raise InvalidArgument(f"{field} must be between {low} and {maximum} micro-credits", field, value=value)
    return value


def require_rate(value: int, field: str) -> int:
    return require_amount(value, field, maximum=MAX_RATE_MICROS)


def voice_rates(rates: Mapping[str, int], field: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for provider, rate in rates.items():
        name = provider.strip().lower()
        if not _PROVIDER.match(name):
            raise InvalidArgument(f"{field} has an invalid provider name {quote(provider)}", field)
        out[name] = require_rate(rate, f"{field}[{quote(provider)}]")
    return out


def sms_rates(rates: Mapping[str, int], field: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for country, rate in rates.items():
        code = country.strip().upper()
        if not _COUNTRY.match(code):
            raise InvalidArgument(f"{field} keys must be ISO 3166-1 alpha-2 codes, not {quote(country)}", field)
        out[code] = require_rate(rate, f"{field}[{quote(country)}]")
    return out


def country(value: str, field: str) -> str:
    code = value.strip().upper()
    if not _COUNTRY.match(code):
        raise InvalidArgument(f"{field} must be an ISO 3166-1 alpha-2 country code", field)
    return code


def anchor_day(value: int, field: str) -> int:
    if value == 0:
        return 1
    if not 1 <= value <= 28:
        raise InvalidArgument(f"{field} must be 1-28 (0 means the 1st)", field)
    return value
