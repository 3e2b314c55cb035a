"""Integer micro-credit arithmetic. There are no floats anywhere near a balance."""

from __future__ import annotations

from decimal import Decimal, Inexact, InvalidOperation, localcontext

MICROS_PER_CREDIT = 1_000_000
SECONDS_PER_MINUTE = 60

# Ceilings that keep every product of the billing formulas below 2**53, so the Redis
# Lua scripts (whose numbers are doubles) compute exactly the same integers as Python.
MAX_AMOUNT_MICROS = 10**14  # one wallet or one top-up: 100 million credits
MAX_RATE_MICROS = 10**10  # per minute or per segment: 10,000 credits
MAX_SEGMENTS = 1_000
MAX_SESSION_SECONDS = 7 * 24 * 3600


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def voice_cost(rate_micros_per_minute: int, seconds: int) -> int:
    """Cost of `seconds` of talk at a per-minute rate: ceil(rate * seconds / 60)."""
    return ceil_div(rate_micros_per_minute * seconds, SECONDS_PER_MINUTE)


def affordable_seconds(rate_micros_per_minute: int, micros: int) -> int | None:
    """The most seconds whose cost fits in `micros`; None when the rate is zero (unbounded)."""
    if rate_micros_per_minute <= 0:
        return None
    return max(0, micros) * SECONDS_PER_MINUTE // rate_micros_per_minute


def sms_cost(rate_micros_per_segment: int, segments: int) -> int:
    return rate_micros_per_segment * segments


def credits(value: str | int | Decimal) -> int:
    """Exact micro-credits of a decimal amount of credits ("0.166" -> 166000)."""
    with localcontext() as exact:
        exact.prec = 100  # enough digits that no input is rounded before the check below
        exact.traps[Inexact] = True
        try:
            micros = Decimal(value) * MICROS_PER_CREDIT
        except (InvalidOperation, Inexact) as exc:
            raise ValueError(f"not a number of credits: {value!r}") from exc
    if not micros.is_finite() or micros != micros.to_integral_value():
        raise ValueError(f"{value!r} credits is not a whole number of micro-credits")
    return int(micros)


def format_credits(micros: int) -> str:
    """Human form of a micro-credit amount, exact: 166000 -> "0.166"."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_CREDIT)
    text = f"{whole}.{frac:06d}".rstrip("0").rstrip(".")
    return sign + text
