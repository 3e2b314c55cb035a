"""Integer micro-credit arithmetic (SPEC section 3)."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from creditd.domain.money import (
    MAX_AMOUNT_MICROS,
    MAX_RATE_MICROS,
    MAX_SESSION_SECONDS,
    MICROS_PER_CREDIT,
    affordable_seconds,
    ceil_div,
    credits,
    format_credits,
    sms_cost,
    voice_cost,
)

ONE_CREDIT_PER_MINUTE = 1_000_000
rates = st.integers(min_value=1, max_value=MAX_RATE_MICROS)
seconds = st.integers(min_value=0, max_value=MAX_SESSION_SECONDS)
amounts = st.integers(min_value=0, max_value=MAX_AMOUNT_MICROS)


# -- voice: per second, rounded up once on the total ---------------------------------------


def test_300_credits_at_one_credit_per_minute_are_exactly_18000_seconds() -> None:
    assert affordable_seconds(ONE_CREDIT_PER_MINUTE, 300 * MICROS_PER_CREDIT) == 18_000
    assert voice_cost(ONE_CREDIT_PER_MINUTE, 18_000) == 300_000_000
    assert voice_cost(ONE_CREDIT_PER_MINUTE, 18_001) == 300_016_667


def test_a_two_second_call_costs_two_seconds_never_a_minute() -> None:
    assert voice_cost(ONE_CREDIT_PER_MINUTE, 2) == 33_334
    assert voice_cost(ONE_CREDIT_PER_MINUTE, 1) == 16_667
    assert voice_cost(ONE_CREDIT_PER_MINUTE, 60) == 1_000_000
    assert voice_cost(ONE_CREDIT_PER_MINUTE, 0) == 0


def test_voice_cost_rounds_up_only_a_fraction_of_a_micro_credit() -> None:
    # 1.5 credits/minute: 25,000 micros per second exactly, no rounding at all.
    assert voice_cost(1_500_000, 1) == 25_000
    assert voice_cost(1_500_000, 61) == 1_525_000
    # 7 micros/minute: 1 second is 7/60 of a micro-credit, charged as 1.
    assert voice_cost(7, 1) == 1
    assert voice_cost(7, 60) == 7
    assert voice_cost(7, 61) == 8


@given(rate=rates, secs=seconds)
def test_voice_cost_is_the_exact_ceiling_of_rate_times_seconds_over_60(rate: int, secs: int) -> None:
    assert voice_cost(rate, secs) == math.ceil(Fraction(rate * secs, 60))


@given(rate=rates, a=seconds, b=seconds)
def test_voice_cost_is_monotonic_and_subadditive(rate: int, a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert voice_cost(rate, low) <= voice_cost(rate, high)
    # One rounding on the total never costs more than rounding two pieces separately.
    assert voice_cost(rate, a + b) <= voice_cost(rate, a) + voice_cost(rate, b)


def test_affordable_seconds_without_a_rate_is_unbounded_and_never_negative() -> None:
    assert affordable_seconds(0, 5_000_000) is None
    assert affordable_seconds(-1, 5_000_000) is None
    assert affordable_seconds(ONE_CREDIT_PER_MINUTE, -5_000_000) == 0
    assert affordable_seconds(ONE_CREDIT_PER_MINUTE, 16_666) == 0
    assert affordable_seconds(ONE_CREDIT_PER_MINUTE, 16_667) == 1


@given(rate=rates, micros=amounts)
def test_affordable_seconds_is_the_most_seconds_whose_cost_fits(rate: int, micros: int) -> None:
    secs = affordable_seconds(rate, micros)
    assert secs is not None
    assert voice_cost(rate, secs) <= micros < voice_cost(rate, secs + 1)


@given(numerator=st.integers(-(10**18), 10**18), denominator=st.integers(1, 10**6))
def test_ceil_div_matches_exact_ceiling(numerator: int, denominator: int) -> None:
    assert ceil_div(numerator, denominator) == math.ceil(Fraction(numerator, denominator))


# -- SMS --------------------------------------------------------------------------------------


def test_83_free_sms_credits_pay_exactly_500_us_segments_and_not_501() -> None:
    us_segment = credits("0.166")
    assert us_segment == 166_000
    assert sms_cost(us_segment, 500) == 83 * MICROS_PER_CREDIT
    assert sms_cost(us_segment, 501) == 83 * MICROS_PER_CREDIT + 166_000
    assert (83 * MICROS_PER_CREDIT) // us_segment == 500


def test_sms_cost_is_rate_times_segments() -> None:
    assert sms_cost(166_000, 3) == 498_000
    assert sms_cost(166_000, 0) == 0


# -- parsing and formatting -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        ("0.166", 166_000),
        ("300", 300_000_000),
        ("83", 83_000_000),
        ("1.5", 1_500_000),
        ("0.000001", 1),
        ("1e-6", 1),
        ("-2.5", -2_500_000),
        ("0", 0),
        (83, 83_000_000),
        (Decimal("0.166"), 166_000),
        (Decimal("12.345678"), 12_345_678),
    ],
)
def test_credits_converts_exactly(value: str | int | Decimal, micros: int) -> None:
    result = credits(value)
    assert result == micros
    assert type(result) is int


@pytest.mark.parametrize("value", ["", "abc", "1.2.3", "0.0000001", "1.0000005", "sNaN", "NaN", "1,5"])
def test_credits_rejects_what_is_not_a_whole_number_of_micro_credits(value: str) -> None:
    with pytest.raises(ValueError):
        credits(value)


@pytest.mark.parametrize("value", ["Infinity", "-inf"])
def test_credits_rejects_infinity_with_value_error(value: str) -> None:
    with pytest.raises(ValueError):
        credits(value)


def test_credits_never_rounds_a_fraction_of_a_micro_credit_away() -> None:
    with pytest.raises(ValueError):
        credits("1000000000000000000000.0000001")


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (166_000, "0.166"),
        (0, "0"),
        (1, "0.000001"),
        (1_000_000, "1"),
        (10_000_000, "10"),
        (300_000_000, "300"),
        (1_500_000, "1.5"),
        (-1_500_000, "-1.5"),
        (-1, "-0.000001"),
        (100_000_010, "100.00001"),
    ],
)
def test_format_credits_is_exact_and_minimal(micros: int, text: str) -> None:
    assert format_credits(micros) == text


@given(micros=st.integers(min_value=-(10**20), max_value=10**20))
def test_format_credits_round_trips_through_credits(micros: int) -> None:
    text = format_credits(micros)
    assert credits(text) == micros
    # The canonical form has no trailing zeros after a decimal point.
    assert not ("." in text and text.endswith("0"))
    assert not text.endswith(".")


@given(whole=st.integers(0, 10**8), frac=st.integers(0, 999_999))
def test_credits_of_a_decimal_string_round_trips_through_format(whole: int, frac: int) -> None:
    micros = credits(f"{whole}.{frac:06d}")
    assert micros == whole * MICROS_PER_CREDIT + frac
    assert credits(format_credits(micros)) == micros
