"""A payer's voice tariff on cumulative seconds, and the terms of one more slice (SPEC section 3)."""

from __future__ import annotations

import itertools

from hypothesis import assume, given
from hypothesis import strategies as st

from creditd.domain.money import MAX_RATE_MICROS, MAX_SESSION_SECONDS, voice_cost
from creditd.domain.tariff import SliceTerms, Tariff

CREDIT = 1_000_000
rates = st.integers(min_value=1, max_value=MAX_RATE_MICROS)


def flat(rate: int) -> Tariff:
    tariff = Tariff()
    tariff.price_from(0, rate)
    return tariff


def test_a_flat_tariff_costs_voice_cost_of_the_total() -> None:
    tariff = flat(CREDIT)
    assert tariff.segments == [(0, CREDIT)]
    assert tariff.cost(0) == 0
    assert tariff.cost(2) == 33_334
    assert tariff.cost(18_000) == 300 * CREDIT


def test_two_second_slices_cost_the_same_as_one_minute_in_one_piece() -> None:
    tariff = flat(CREDIT)
    charged = 0
    for granted in range(0, 60, 2):
        tariff.price_from(granted, CREDIT)  # same rate: no new segment
        charged += tariff.terms(granted).needed(2)
    assert tariff.segments == [(0, CREDIT)]
    assert charged == CREDIT
    # Rounding every slice on its own would have overcharged by 20 micro-credits.
    assert sum(voice_cost(CREDIT, 2) for _ in range(30)) == CREDIT + 20


@given(rate=rates, cuts=st.lists(st.integers(1, MAX_SESSION_SECONDS), max_size=30), end=st.integers(0, 7200))
def test_slicing_a_call_never_changes_its_total(rate: int, cuts: list[int], end: int) -> None:
    boundaries = sorted({0, *(c % (end + 1) for c in cuts), end})
    tariff = flat(rate)
    charged = 0
    for granted, upto in itertools.pairwise(boundaries):
        tariff.price_from(granted, rate)
        terms = tariff.terms(granted)
        charged += terms.needed(upto - granted)
        assert tariff.cost(upto) == charged
    assert charged == tariff.cost(end) == voice_cost(rate, end)
    assert tariff.segments == [(0, rate)]


def test_a_rate_change_starts_a_new_segment_from_the_next_slice() -> None:
    tariff = flat(CREDIT)
    tariff.price_from(60, 2 * CREDIT)
    assert tariff.segments == [(0, CREDIT), (60, 2 * CREDIT)]
    assert tariff.cost(30) == 500_000  # before the change: the old rate only
    assert tariff.cost(60) == CREDIT
    assert tariff.cost(61) == CREDIT + 33_334
    assert tariff.cost(90) == 2 * CREDIT
    tariff.price_from(90, 1_500_000)
    assert tariff.segments == [(0, CREDIT), (60, 2 * CREDIT), (90, 1_500_000)]
    assert tariff.cost(150) == CREDIT + CREDIT + 1_500_000


def test_each_segment_is_rounded_up_on_its_own_seconds() -> None:
    tariff = flat(CREDIT)
    tariff.price_from(1, 2 * CREDIT)
    # ceil(1,000,000 / 60) + ceil(2,000,000 / 60) = 16,667 + 33,334
    assert tariff.cost(2) == 50_001


def test_a_rate_decided_again_before_any_second_replaces_the_last_segment() -> None:
    tariff = flat(CREDIT)
    tariff.price_from(60, 2 * CREDIT)
    tariff.price_from(60, 3 * CREDIT)
    assert tariff.segments == [(0, CREDIT), (60, 3 * CREDIT)]
    tariff = Tariff()
    tariff.price_from(0, CREDIT)
    tariff.price_from(0, 1_500_000)
    assert tariff.segments == [(0, 1_500_000)]
    assert tariff.cost(60) == 1_500_000


def test_a_rate_changed_and_changed_back_before_any_second_costs_like_one_rate() -> None:
    tariff = flat(CREDIT)
    tariff.price_from(1, 2 * CREDIT)  # a renewal priced at a new rate that reserved nothing
    tariff.price_from(1, CREDIT)  # the next renewal, at the same second, is back to the old rate
    assert tariff.cost(3) == voice_cost(CREDIT, 3) == 50_000


def test_terms_after_a_rate_change() -> None:
    tariff = flat(CREDIT)
    tariff.price_from(60, 2 * CREDIT)
    terms = tariff.terms(75)
    assert terms == SliceTerms(rate=2 * CREDIT, carry=500_000, offset=15)
    assert terms.needed(0) == 0
    assert terms.needed(1) == tariff.cost(76) - tariff.cost(75) == 33_334
    assert terms.needed(45) == 1_500_000
    assert terms.affordable(1_500_000) == 45
    assert terms.affordable(1_499_999) == 44


def test_300_free_credits_reserve_exactly_18000_seconds_at_one_credit_per_minute() -> None:
    terms = flat(CREDIT).terms(0)
    assert terms == SliceTerms(rate=CREDIT, carry=0, offset=0)
    assert terms.affordable(300 * CREDIT) == 18_000
    assert terms.needed(18_000) == 300 * CREDIT


def test_affordable_is_unbounded_without_headroom_or_rate() -> None:
    assert SliceTerms(rate=CREDIT, carry=0, offset=0).affordable(None) is None
    assert SliceTerms(rate=0, carry=0, offset=0).affordable(5 * CREDIT) is None


@st.composite
def tariffs(draw: st.DrawFn) -> tuple[Tariff, int]:
    """A real tariff built slice by slice with rate changes, and the seconds granted so far."""
    tariff = Tariff()
    granted = 0
    for _ in range(draw(st.integers(1, 6))):
        tariff.price_from(granted, draw(rates))
        granted += draw(st.integers(0, 3_600))
    return tariff, granted


@given(case=tariffs(), more=st.integers(0, 7_200))
def test_needed_is_exactly_what_the_next_seconds_add_to_the_total(case: tuple[Tariff, int], more: int) -> None:
    tariff, granted = case
    terms = tariff.terms(granted)
    assert terms.rate == tariff.segments[-1][1]
    assert terms.needed(more) == tariff.cost(granted + more) - tariff.cost(granted)


@given(case=tariffs(), headroom=st.integers(0, 10**14))
def test_affordable_is_the_most_seconds_that_headroom_pays_for(case: tuple[Tariff, int], headroom: int) -> None:
    tariff, granted = case
    terms = tariff.terms(granted)
    seconds = terms.affordable(headroom)
    assert seconds is not None and seconds >= 0
    assert terms.needed(seconds) <= headroom
    assert terms.needed(seconds + 1) > headroom


@given(case=tariffs(), a=st.integers(0, 3_600), b=st.integers(0, 3_600))
def test_cost_grows_with_seconds(case: tuple[Tariff, int], a: int, b: int) -> None:
    tariff, granted = case
    low, high = sorted((a, b))
    assert tariff.cost(granted + low) <= tariff.cost(granted + high)


@given(rate=rates, first=st.integers(0, 3_600), second=st.integers(0, 3_600))
def test_reserving_in_two_steps_costs_the_same_as_in_one(rate: int, first: int, second: int) -> None:
    assume(first + second > 0)
    tariff = flat(rate)
    step_one = tariff.terms(0).needed(first)
    step_two = tariff.terms(first).needed(second)
    assert step_one + step_two == tariff.terms(0).needed(first + second) == voice_cost(rate, first + second)
