"""Billing periods: calendar months in UTC, or months from an anchor day (SPEC section 2)."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from creditd.domain.periods import MAX_ANCHOR_DAY, MIN_ANCHOR_DAY, period_bounds, period_bounds_epoch

MICROSECOND = timedelta(microseconds=1)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def epoch(*args: int) -> int:
    return calendar.timegm(datetime(*args).timetuple())  # type: ignore[misc]


def test_default_period_is_the_calendar_month_in_utc() -> None:
    assert period_bounds(utc(2024, 2, 15, 12, 30)) == (utc(2024, 2, 1), utc(2024, 3, 1))
    assert period_bounds(utc(2023, 4, 30, 23, 59, 59)) == (utc(2023, 4, 1), utc(2023, 5, 1))


def test_leap_february_is_29_days_long() -> None:
    start, end = period_bounds_epoch(epoch(2024, 2, 10))
    assert (start, end) == (epoch(2024, 2, 1), epoch(2024, 3, 1))
    assert end - start == 29 * 86_400
    start, end = period_bounds_epoch(epoch(2023, 2, 10))
    assert end - start == 28 * 86_400


def test_boundary_is_exactly_the_anchor_instant() -> None:
    boundary = utc(2024, 3, 1)
    assert period_bounds(boundary) == (utc(2024, 3, 1), utc(2024, 4, 1))
    assert period_bounds(boundary - MICROSECOND) == (utc(2024, 2, 1), utc(2024, 3, 1))
    assert period_bounds_epoch(epoch(2024, 3, 1)) == (epoch(2024, 3, 1), epoch(2024, 4, 1))
    assert period_bounds_epoch(epoch(2024, 3, 1) - 1) == (epoch(2024, 2, 1), epoch(2024, 3, 1))


def test_anchor_day_starts_the_period_on_that_day() -> None:
    assert period_bounds(utc(2024, 1, 15), anchor_day=15) == (utc(2024, 1, 15), utc(2024, 2, 15))
    assert period_bounds(utc(2024, 1, 20, 8), anchor_day=15) == (utc(2024, 1, 15), utc(2024, 2, 15))
    assert period_bounds(utc(2024, 1, 15) - MICROSECOND, anchor_day=15) == (utc(2023, 12, 15), utc(2024, 1, 15))


def test_december_runs_into_january_of_the_next_year() -> None:
    assert period_bounds(utc(2024, 12, 31, 23, 59, 59)) == (utc(2024, 12, 1), utc(2025, 1, 1))
    assert period_bounds(utc(2025, 1, 1)) == (utc(2025, 1, 1), utc(2025, 2, 1))
    assert period_bounds(utc(2024, 12, 20), anchor_day=15) == (utc(2024, 12, 15), utc(2025, 1, 15))
    assert period_bounds(utc(2025, 1, 5), anchor_day=28) == (utc(2024, 12, 28), utc(2025, 1, 28))
    assert period_bounds_epoch(epoch(2025, 1, 10), anchor_day=15) == (epoch(2024, 12, 15), epoch(2025, 1, 15))


def test_anchor_28_exists_in_every_february() -> None:
    assert period_bounds(utc(2023, 2, 28), anchor_day=28) == (utc(2023, 2, 28), utc(2023, 3, 28))
    assert period_bounds(utc(2023, 3, 1), anchor_day=28) == (utc(2023, 2, 28), utc(2023, 3, 28))
    assert period_bounds(utc(2024, 2, 29), anchor_day=28) == (utc(2024, 2, 28), utc(2024, 3, 28))


def test_other_time_zones_are_converted_to_utc_first() -> None:
    # 01:00 on March 1st at +02:00 is still February 29th in UTC.
    plus_two = timezone(timedelta(hours=2))
    assert period_bounds(datetime(2024, 3, 1, 1, 0, tzinfo=plus_two)) == (utc(2024, 2, 1), utc(2024, 3, 1))
    # 20:00 on February 29th at -05:00 is already March 1st in UTC.
    minus_five = timezone(timedelta(hours=-5))
    assert period_bounds(datetime(2024, 2, 29, 20, 0, tzinfo=minus_five)) == (utc(2024, 3, 1), utc(2024, 4, 1))


@pytest.mark.parametrize("anchor", [0, -1, 29, 30, 31, 100])
def test_anchor_outside_1_to_28_is_rejected(anchor: int) -> None:
    with pytest.raises(ValueError):
        period_bounds(utc(2024, 5, 5), anchor_day=anchor)
    with pytest.raises(ValueError):
        period_bounds_epoch(epoch(2024, 5, 5), anchor_day=anchor)


offsets = st.integers(min_value=-23 * 60, max_value=23 * 60).map(lambda m: timezone(timedelta(minutes=m)))
instants = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=offsets)
anchors = st.integers(min_value=MIN_ANCHOR_DAY, max_value=MAX_ANCHOR_DAY)


@given(now=instants, anchor=anchors)
def test_period_holds_now_and_is_one_month_from_anchor_to_anchor(now: datetime, anchor: int) -> None:
    start, end = period_bounds(now, anchor)
    assert start <= now < end
    for bound in (start, end):
        assert bound.tzinfo is UTC
        assert (bound.day, bound.hour, bound.minute, bound.second, bound.microsecond) == (anchor, 0, 0, 0, 0)
    assert (end.year * 12 + end.month) - (start.year * 12 + start.month) == 1


@given(now=instants, anchor=anchors)
def test_periods_tile_time_without_gaps(now: datetime, anchor: int) -> None:
    start, end = period_bounds(now, anchor)
    assert period_bounds(end, anchor)[0] == end
    assert period_bounds(end - MICROSECOND, anchor) == (start, end)
    assert period_bounds(start - MICROSECOND, anchor)[1] == start


@given(now=st.integers(min_value=0, max_value=7_258_118_400), anchor=anchors)
def test_epoch_bounds_agree_with_datetime_bounds(now: int, anchor: int) -> None:
    start, end = period_bounds(datetime.fromtimestamp(now, UTC), anchor)
    assert period_bounds_epoch(now, anchor) == (int(start.timestamp()), int(end.timestamp()))
    assert period_bounds_epoch(now, anchor)[0] <= now < period_bounds_epoch(now, anchor)[1]
