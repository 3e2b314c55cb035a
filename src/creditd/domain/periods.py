"""Billing periods: months in UTC starting on an anchor day (the 1st unless configured)."""

from __future__ import annotations

from datetime import UTC, datetime

MIN_ANCHOR_DAY = 1
MAX_ANCHOR_DAY = 28  # every month has it


def _month_start(year: int, month: int, anchor_day: int) -> datetime:
    return datetime(year, month, anchor_day, tzinfo=UTC)


def _add_months(year: int, month: int, months: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + months
    return index // 12, index % 12 + 1


def period_bounds(now: datetime, anchor_day: int = MIN_ANCHOR_DAY) -> tuple[datetime, datetime]:
    """The [start, end) of the period holding `now`."""
    if not MIN_ANCHOR_DAY <= anchor_day <= MAX_ANCHOR_DAY:
        raise ValueError(f"anchor day must be {MIN_ANCHOR_DAY}-{MAX_ANCHOR_DAY}, not {anchor_day}")
    now = now.astimezone(UTC)
    year, month = now.year, now.month
    if now.day < anchor_day:
        year, month = _add_months(year, month, -1)
    end_year, end_month = _add_months(year, month, 1)
    return _month_start(year, month, anchor_day), _month_start(end_year, end_month, anchor_day)


def period_bounds_epoch(now_epoch: float, anchor_day: int = MIN_ANCHOR_DAY) -> tuple[int, int]:
    """Period bounds as whole epoch seconds, the form the hot stores keep."""
    start, end = period_bounds(datetime.fromtimestamp(now_epoch, UTC), anchor_day)
    return int(start.timestamp()), int(end.timestamp())
