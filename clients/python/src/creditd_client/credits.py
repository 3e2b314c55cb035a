"""Exact conversion between credits and integer micro-credits (1 credit = 1,000,000 micros)."""

from __future__ import annotations

from decimal import Decimal, Inexact, InvalidOperation, localcontext

MICROS_PER_CREDIT = 1_000_000


def to_micros(credits: str | int | Decimal) -> int:
    """Micro-credits of an amount of credits: "12" -> 12000000, "0.166" -> 166000.

    Raises ValueError for anything that is not a whole number of micro-credits ("0.0000001").
    """
    if isinstance(credits, float):
        raise TypeError("pass credits as a string, an int or a Decimal, never a float")
    with localcontext() as exact:
        exact.prec = 100
        exact.traps[Inexact] = True
        try:
            micros = Decimal(credits.strip() if isinstance(credits, str) else credits) * MICROS_PER_CREDIT
        except (InvalidOperation, Inexact, ValueError) as exc:
            raise ValueError(f"not a number of credits: {credits!r}") from exc
    if not micros.is_finite() or micros != micros.to_integral_value():
        raise ValueError(f"{credits!r} credits is not a whole number of micro-credits")
    return int(micros)


def format_credits(micros: int) -> str:
    """Credits of a micro-credit amount, exact and without trailing zeros: 166000 -> "0.166"."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_CREDIT)
    text = f"{whole}.{fraction:06d}".rstrip("0").rstrip(".")
    return sign + text
