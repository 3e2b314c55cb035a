"""One balance of one account: burn order, headroom, period roll, alerts (SPEC sections 2-3)."""

from __future__ import annotations

import calendar
from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from creditd.domain.records import BalanceType, EntryKind, EventRecord, EventType, LedgerRecord
from creditd.domain.wallet import (
    Constraint,
    RefillSettings,
    WalletConfig,
    WalletState,
    new_wallet,
    refill_key,
)

CREDIT = 1_000_000


def epoch(*args: int) -> int:
    return calendar.timegm(datetime(*args).timetuple())  # type: ignore[misc]


MARCH_START = epoch(2024, 3, 1)
APRIL_START = epoch(2024, 4, 1)
MAY_START = epoch(2024, 5, 1)
NOW = epoch(2024, 3, 10, 12)


def wallet(
    *,
    free: int = 0,
    purchased: int = 0,
    reserved: int = 0,
    used: int = 0,
    account_id: str = "acme",
    balance_type: BalanceType = BalanceType.VOICE,
    **config: object,
) -> WalletState:
    state = new_wallet(account_id, balance_type, WalletConfig(**config), NOW)  # type: ignore[arg-type]
    state.free_micros = free
    state.purchased_micros = purchased
    state.reserved_micros = reserved
    state.used_micros = used
    return state


def events_of(records: list[EventRecord], type_: EventType) -> list[EventRecord]:
    return [r for r in records if r.type is type_]


# -- a new wallet -----------------------------------------------------------------------------


def test_new_wallet_starts_in_the_period_holding_now_with_nothing_in_it() -> None:
    state = new_wallet("acme", BalanceType.SMS, WalletConfig(free_allowance_micros=83 * CREDIT), NOW)
    assert (state.period_start, state.period_end) == (MARCH_START, APRIL_START)
    assert (state.free_micros, state.purchased_micros, state.reserved_micros, state.used_micros) == (0, 0, 0, 0)


def test_new_wallet_honours_the_anchor_day() -> None:
    state = new_wallet("acme", BalanceType.VOICE, WalletConfig(anchor_day=15), NOW)
    assert (state.period_start, state.period_end) == (epoch(2024, 2, 15), epoch(2024, 3, 15))


# -- burn order: free before purchased ---------------------------------------------------------


def test_debit_burns_free_credits_before_purchased_ones_and_returns_the_split() -> None:
    state = wallet(free=100 * CREDIT, purchased=50 * CREDIT)
    assert state.debit(30 * CREDIT) == (30 * CREDIT, 0)
    assert (state.free_micros, state.purchased_micros) == (70 * CREDIT, 50 * CREDIT)
    assert state.debit(90 * CREDIT) == (70 * CREDIT, 20 * CREDIT)
    assert (state.free_micros, state.purchased_micros) == (0, 30 * CREDIT)
    assert state.debit(33_334) == (0, 33_334)
    assert state.purchased_micros == 30 * CREDIT - 33_334
    assert state.used_micros == 120 * CREDIT + 33_334


def test_debit_can_empty_the_wallet_to_exactly_zero() -> None:
    state = wallet(free=166_000, purchased=166_000)
    assert state.debit(332_000) == (166_000, 166_000)
    assert (state.free_micros, state.purchased_micros) == (0, 0)


def test_debit_beyond_the_wallet_raises() -> None:
    state = wallet(free=10, purchased=5)
    with pytest.raises(ValueError):
        state.debit(16)
    assert (state.free_micros, state.purchased_micros) == (10, 5)


def test_a_refused_debit_leaves_usage_untouched() -> None:
    state = wallet(free=10, purchased=5)
    with pytest.raises(ValueError):
        state.debit(16)
    assert state.used_micros == 0


def test_debit_of_a_walletless_account_only_counts_usage() -> None:
    state = wallet(has_wallet=False, usage_limit_micros=500 * CREDIT)
    assert state.debit(166_000) == (0, 0)
    assert state.used_micros == 166_000
    assert (state.free_micros, state.purchased_micros) == (0, 0)
    assert state.headroom() == (500 * CREDIT - 166_000, Constraint.LIMIT)


def test_settle_releases_the_reservation_and_debits_the_actual_cost_free_first() -> None:
    state = wallet(free=30 * CREDIT, purchased=100 * CREDIT)
    state.reserve(70 * CREDIT)
    assert state.wallet_available() == 60 * CREDIT
    assert state.settle(70 * CREDIT, 60 * CREDIT + 33_334) == (30 * CREDIT, 30 * CREDIT + 33_334)
    assert state.reserved_micros == 0
    assert (state.free_micros, state.purchased_micros) == (0, 70 * CREDIT - 33_334)
    assert state.used_micros == 60 * CREDIT + 33_334
    assert state.wallet_available() == 70 * CREDIT - 33_334


def test_settle_releases_only_its_own_reservation() -> None:
    state = wallet(free=300 * CREDIT)
    state.reserve(40 * CREDIT)
    state.reserve(25 * CREDIT)
    assert state.settle(40 * CREDIT, 33_334) == (33_334, 0)
    assert state.reserved_micros == 25 * CREDIT
    assert state.wallet_available() == 300 * CREDIT - 33_334 - 25 * CREDIT


@pytest.mark.parametrize(
    ("released", "cost"),
    [
        (10 * CREDIT, 10 * CREDIT + 1),  # costs more than it released
        (20 * CREDIT + 1, 5 * CREDIT),  # releases more than is reserved
        (5 * CREDIT, -1),  # a negative cost would credit the wallet
        (-1, -1),
    ],
)
def test_settle_outside_its_reservation_raises_and_changes_nothing(released: int, cost: int) -> None:
    state = wallet(free=5 * CREDIT, purchased=15 * CREDIT)
    state.reserve(20 * CREDIT)
    with pytest.raises(ValueError):
        state.settle(released, cost)
    assert (state.free_micros, state.purchased_micros, state.reserved_micros, state.used_micros) == (
        5 * CREDIT,
        15 * CREDIT,
        20 * CREDIT,
        0,
    )


@st.composite
def sessions(draw: st.DrawFn) -> tuple[int, int, list[tuple[int, int]]]:
    """A backed wallet and sessions that reserve within it and settle at most what they reserved."""
    free = draw(st.integers(0, 500 * CREDIT))
    purchased = draw(st.integers(0, 500 * CREDIT))
    room = free + purchased
    plan: list[tuple[int, int]] = []
    for _ in range(draw(st.integers(0, 6))):
        reserve = draw(st.integers(0, room))
        room -= reserve
        plan.append((reserve, draw(st.integers(0, reserve))))
    return free, purchased, plan


@given(sessions())
def test_settling_backed_reservations_never_goes_below_zero_and_burns_free_first(
    case: tuple[int, int, list[tuple[int, int]]],
) -> None:
    free, purchased, plan = case
    state = wallet(free=free, purchased=purchased)
    for reserve, _ in plan:
        state.reserve(reserve)
    total_free = total_purchased = 0
    for reserve, cost in plan:
        from_free, from_purchased = state.settle(reserve, cost)
        assert from_free + from_purchased == cost
        assert from_purchased == 0 or state.free_micros == 0
        total_free += from_free
        total_purchased += from_purchased
        assert state.free_micros >= 0
        assert state.purchased_micros >= 0
        available = state.wallet_available()
        assert available is not None and available >= 0
    total = sum(cost for _, cost in plan)
    assert state.reserved_micros == 0
    assert total_free == min(free, total)
    assert total_purchased == total - total_free
    assert (state.free_micros, state.purchased_micros) == (free - total_free, purchased - total_purchased)
    assert state.used_micros == total


# -- headroom: the binding constraint ---------------------------------------------------------


def test_headroom_is_the_wallet_when_the_wallet_binds() -> None:
    state = wallet(free=100 * CREDIT, reserved=10 * CREDIT, usage_limit_micros=500 * CREDIT)
    assert state.wallet_available() == 90 * CREDIT
    assert state.limit_available() == 490 * CREDIT
    assert state.headroom() == (90 * CREDIT, Constraint.WALLET)
    assert state.available() == 90 * CREDIT


def test_headroom_is_the_limit_when_the_limit_binds() -> None:
    state = wallet(
        free=100 * CREDIT,
        purchased=100 * CREDIT,
        reserved=10 * CREDIT,
        used=20 * CREDIT,
        usage_limit_micros=50 * CREDIT,
    )
    assert state.headroom() == (20 * CREDIT, Constraint.LIMIT)
    assert state.available() == 20 * CREDIT


def test_headroom_names_the_limit_on_a_tie() -> None:
    state = wallet(free=30 * CREDIT, used=20 * CREDIT, usage_limit_micros=50 * CREDIT)
    assert state.headroom() == (30 * CREDIT, Constraint.LIMIT)


def test_headroom_without_a_limit_is_the_wallet() -> None:
    state = wallet(free=300 * CREDIT, purchased=200 * CREDIT, reserved=1)
    assert state.limit_available() is None
    assert state.headroom() == (500 * CREDIT - 1, Constraint.WALLET)


def test_agency_paid_client_without_a_limit_is_unbounded() -> None:
    state = wallet(has_wallet=False, used=10_000 * CREDIT)
    assert state.wallet_available() is None
    assert state.limit_available() is None
    assert state.headroom() == (None, None)
    assert state.available() == 0
    assert state.alert_level() is None


def test_agency_paid_client_with_a_limit_is_bound_by_the_limit() -> None:
    state = wallet(has_wallet=False, usage_limit_micros=500 * CREDIT, used=300 * CREDIT, reserved=50 * CREDIT)
    assert state.headroom() == (150 * CREDIT, Constraint.LIMIT)
    assert state.alert_level() == 150 * CREDIT


def test_headroom_never_goes_below_zero_when_a_limit_is_lowered_under_usage() -> None:
    state = wallet(free=100 * CREDIT, used=80 * CREDIT, usage_limit_micros=50 * CREDIT)
    assert state.limit_available() == -30 * CREDIT
    assert state.headroom() == (0, Constraint.LIMIT)
    assert state.available() == 0


@given(
    free=st.integers(0, 10**9),
    purchased=st.integers(0, 10**9),
    reserved=st.integers(0, 10**9),
    used=st.integers(0, 10**9),
    limit=st.integers(0, 2 * 10**9),
)
def test_headroom_is_the_smaller_bound_clamped_at_zero(
    free: int, purchased: int, reserved: int, used: int, limit: int
) -> None:
    state = wallet(free=free, purchased=purchased, reserved=reserved, used=used, usage_limit_micros=limit)
    value, constraint = state.headroom()
    wallet_room = free + purchased - reserved
    bounds = [wallet_room] + ([limit - used - reserved] if limit > 0 else [])
    assert value == max(0, min(bounds))
    if limit > 0 and limit - used - reserved < wallet_room:
        assert constraint is Constraint.LIMIT
    elif limit <= 0 or wallet_room < limit - used - reserved:
        assert constraint is Constraint.WALLET


# -- the period boundary ----------------------------------------------------------------------


def test_roll_period_does_nothing_before_the_period_ends() -> None:
    state = wallet(free=120 * CREDIT, used=5 * CREDIT, free_allowance_micros=300 * CREDIT)
    assert state.roll_period(APRIL_START - 0.001) == []
    assert (state.free_micros, state.used_micros, state.period_end) == (120 * CREDIT, 5 * CREDIT, APRIL_START)


def test_roll_period_resets_free_credits_and_records_expiry_and_allowance() -> None:
    state = wallet(
        free=120 * CREDIT,
        purchased=50 * CREDIT,
        used=180 * CREDIT,
        free_allowance_micros=300 * CREDIT,
        usage_limit_micros=400 * CREDIT,
    )
    state.refills_this_period = 2
    state.limit_notified = True

    records = state.roll_period(APRIL_START)  # exactly the boundary instant

    assert [(type(r), r.kind if isinstance(r, LedgerRecord) else r.type) for r in records] == [
        (LedgerRecord, EntryKind.FREE_EXPIRY),
        (EventRecord, EventType.FREE_CREDITS_EXPIRED),
        (LedgerRecord, EntryKind.FREE_ALLOWANCE),
    ]
    expiry, expired_event, allowance = records
    assert isinstance(expiry, LedgerRecord) and isinstance(allowance, LedgerRecord)
    assert isinstance(expired_event, EventRecord)
    assert (expiry.amount_micros, expiry.free_micros, expiry.purchased_micros) == (-120 * CREDIT, -120 * CREDIT, 0)
    assert expired_event.amount_micros == 120 * CREDIT
    assert (allowance.amount_micros, allowance.free_micros, allowance.purchased_micros) == (
        300 * CREDIT,
        300 * CREDIT,
        0,
    )
    for record in records:
        assert (record.account_id, record.balance_type, record.created_at) == ("acme", BalanceType.VOICE, APRIL_START)
    assert expiry.usage_micros == 0 and allowance.usage_micros == 0

    assert state.free_micros == 300 * CREDIT
    assert state.purchased_micros == 50 * CREDIT  # purchased credits never expire
    assert state.used_micros == 0
    assert state.refills_this_period == 0
    assert state.limit_notified is False
    assert (state.period_start, state.period_end) == (APRIL_START, MAY_START)
    assert state.roll_period(APRIL_START + 1) == []


def test_roll_period_without_unused_free_credits_only_grants_the_allowance() -> None:
    state = wallet(purchased=7 * CREDIT, free_allowance_micros=83 * CREDIT, balance_type=BalanceType.SMS)
    records = state.roll_period(APRIL_START + 3600)
    assert len(records) == 1
    (grant,) = records
    assert isinstance(grant, LedgerRecord)
    assert (grant.kind, grant.amount_micros, grant.balance_type) == (
        EntryKind.FREE_ALLOWANCE,
        83 * CREDIT,
        BalanceType.SMS,
    )
    assert (state.free_micros, state.purchased_micros) == (83 * CREDIT, 7 * CREDIT)


def test_roll_period_with_no_allowance_expires_everything_free() -> None:
    state = wallet(free=12 * CREDIT, purchased=3 * CREDIT)
    records = state.roll_period(APRIL_START)
    assert [r.amount_micros for r in records] == [-12 * CREDIT, 12 * CREDIT]
    assert (state.free_micros, state.purchased_micros) == (0, 3 * CREDIT)


def test_roll_period_after_several_idle_months_lands_in_the_current_one() -> None:
    state = wallet(free=1 * CREDIT, free_allowance_micros=300 * CREDIT)
    records = state.roll_period(epoch(2024, 7, 15))
    assert (state.period_start, state.period_end) == (epoch(2024, 7, 1), epoch(2024, 8, 1))
    assert [r.amount_micros for r in records] == [-1 * CREDIT, 1 * CREDIT, 300 * CREDIT]
    assert state.free_micros == 300 * CREDIT


def test_roll_period_follows_the_anchor_day_across_the_year_end() -> None:
    state = new_wallet(
        "acme", BalanceType.VOICE, WalletConfig(free_allowance_micros=5, anchor_day=20), epoch(2024, 12, 25)
    )
    assert (state.period_start, state.period_end) == (epoch(2024, 12, 20), epoch(2025, 1, 20))
    assert state.roll_period(epoch(2025, 1, 20) - 1) == []
    state.roll_period(epoch(2025, 1, 20))
    assert (state.period_start, state.period_end) == (epoch(2025, 1, 20), epoch(2025, 2, 20))
    assert state.free_micros == 5


def test_roll_period_carries_only_the_free_credits_live_reservations_need() -> None:
    # 200 credits reserved by live calls; after the roll 20 purchased + 100 new free cover 120,
    # so 80 of the 250 old free credits must be carried and 170 expire.
    state = wallet(free=250 * CREDIT, purchased=20 * CREDIT, reserved=200 * CREDIT, free_allowance_micros=100 * CREDIT)
    records = state.roll_period(APRIL_START)
    assert [r.amount_micros for r in records] == [-170 * CREDIT, 170 * CREDIT, 100 * CREDIT]
    assert state.free_micros == 180 * CREDIT
    assert state.wallet_available() == 0
    assert state.settle(200 * CREDIT, 200 * CREDIT) == (180 * CREDIT, 20 * CREDIT)
    assert (state.free_micros, state.purchased_micros) == (0, 0)


def test_roll_period_carries_nothing_when_purchased_credits_back_the_reservations() -> None:
    state = wallet(free=40 * CREDIT, purchased=60 * CREDIT, reserved=50 * CREDIT, free_allowance_micros=10 * CREDIT)
    records = state.roll_period(APRIL_START)
    assert [r.amount_micros for r in records] == [-40 * CREDIT, 40 * CREDIT, 10 * CREDIT]
    assert state.free_micros == 10 * CREDIT


def test_roll_period_of_a_walletless_account_only_resets_usage() -> None:
    state = wallet(has_wallet=False, used=500 * CREDIT, reserved=2 * CREDIT, usage_limit_micros=500 * CREDIT)
    state.limit_notified = True
    assert state.roll_period(APRIL_START) == []
    assert (state.free_micros, state.used_micros, state.reserved_micros) == (0, 0, 2 * CREDIT)
    assert state.limit_notified is False
    assert state.headroom() == (498 * CREDIT, Constraint.LIMIT)


@given(
    free=st.integers(0, 10**9),
    purchased=st.integers(0, 10**9),
    reserved_share=st.floats(0, 1),
    allowance=st.integers(0, 10**9),
)
def test_roll_period_keeps_reservations_backed_with_the_fewest_free_credits(
    free: int, purchased: int, reserved_share: float, allowance: int
) -> None:
    reserved = int((free + purchased) * reserved_share)
    state = wallet(free=free, purchased=purchased, reserved=reserved, free_allowance_micros=allowance)
    records = state.roll_period(APRIL_START)
    carried = state.free_micros - allowance
    assert 0 <= carried <= free
    assert state.purchased_micros == purchased
    assert state.free_micros + state.purchased_micros >= reserved
    if carried > 0:  # carried exactly what the reservations need, not a micro more
        assert state.free_micros + state.purchased_micros == reserved
    # The ledger explains the change of the free balance to the micro-credit.
    ledger = [r for r in records if isinstance(r, LedgerRecord)]
    assert sum(r.free_micros for r in ledger) == state.free_micros - free
    assert all(r.purchased_micros == 0 for r in ledger)
    expired = [r for r in records if isinstance(r, EventRecord)]
    assert sum(e.amount_micros for e in expired) == free - carried


# -- alerts: one per downward crossing --------------------------------------------------------


def test_low_balance_fires_once_per_downward_crossing_not_once_per_debit() -> None:
    state = wallet(purchased=150 * CREDIT, low_balance_threshold_micros=100 * CREDIT)
    fired: list[list[EventRecord]] = []
    for cost in (40 * CREDIT, 20 * CREDIT, 30 * CREDIT, 10 * CREDIT):
        before = state.alert_level()
        state.debit(cost)
        fired.append(state.alerts(before, NOW))
    # 150 -> 110 (above), 110 -> 90 (crossing), 90 -> 60, 60 -> 50 (already below)
    assert [len(f) for f in fired] == [0, 1, 0, 0]
    (event,) = fired[1]
    assert (event.type, event.amount_micros, event.account_id) == (EventType.LOW_BALANCE, 90 * CREDIT, "acme")
    # A top-up back above the threshold re-arms it: the next crossing fires once more.
    state.credit(100 * CREDIT, to_free=False)
    before = state.alert_level()
    state.debit(60 * CREDIT)
    assert [e.type for e in state.alerts(before, NOW)] == [EventType.LOW_BALANCE]


def test_landing_exactly_on_the_threshold_is_not_a_crossing_but_leaving_it_is() -> None:
    state = wallet(purchased=150 * CREDIT, low_balance_threshold_micros=100 * CREDIT)
    before = state.alert_level()
    state.debit(50 * CREDIT)
    assert state.alerts(before, NOW) == []
    before = state.alert_level()
    state.debit(1)
    assert [e.type for e in state.alerts(before, NOW)] == [EventType.LOW_BALANCE]


def test_a_reservation_counts_toward_the_alert_level() -> None:
    state = wallet(free=120 * CREDIT, low_balance_threshold_micros=100 * CREDIT)
    before = state.alert_level()
    state.reserve(30 * CREDIT)
    (event,) = state.alerts(before, NOW)
    assert event.amount_micros == 90 * CREDIT


def refilling(max_per_period: int = 2, **overrides: int) -> WalletState:
    settings = {"threshold_micros": 100 * CREDIT, "amount_micros": 500 * CREDIT, **overrides}
    refill = RefillSettings(enabled=True, max_per_period=max_per_period, **settings)
    return wallet(purchased=150 * CREDIT, refill=refill, low_balance_threshold_micros=100 * CREDIT)


def cross(state: WalletState, cost: int, now: float = NOW) -> list[EventRecord]:
    before = state.alert_level()
    state.debit(cost)
    return state.alerts(before, now)


def test_one_refill_request_per_crossing_with_a_deterministic_key() -> None:
    state = refilling()
    events = cross(state, 60 * CREDIT)
    assert [e.type for e in events] == [EventType.LOW_BALANCE, EventType.REFILL_REQUESTED]
    request = events[1]
    assert request.amount_micros == 500 * CREDIT
    assert request.idempotency_key == refill_key("acme", BalanceType.VOICE, MARCH_START, 1)
    assert request.idempotency_key == f"refill:acme:voice:{MARCH_START}:1"
    assert state.refills_this_period == 1
    # Further debits below the threshold raise nothing more.
    assert cross(state, 10 * CREDIT) == []
    assert cross(state, 10 * CREDIT) == []
    assert state.refills_this_period == 1


def test_at_most_max_per_period_refills_then_a_new_period_starts_counting_again() -> None:
    state = refilling(max_per_period=2)
    keys = []
    for _ in range(4):
        state.credit(200 * CREDIT, to_free=False)  # the refill (or any top-up) lands
        keys.append([e.idempotency_key for e in cross(state, state.alert_level() - 50 * CREDIT)])  # type: ignore[operator]
    assert keys == [
        ["", f"refill:acme:voice:{MARCH_START}:1"],
        ["", f"refill:acme:voice:{MARCH_START}:2"],
        [""],  # still warned low, but no third refill this period
        [""],
    ]
    assert state.refills_this_period == 2
    state.roll_period(APRIL_START)
    state.credit(200 * CREDIT, to_free=False)
    events = cross(state, state.alert_level() - 50 * CREDIT, now=APRIL_START + 5)  # type: ignore[operator]
    assert events[-1].idempotency_key == f"refill:acme:voice:{APRIL_START}:1"


def test_the_same_crossing_always_yields_the_same_key() -> None:
    first, second = refilling(), refilling()
    a = cross(first, 60 * CREDIT)
    b = cross(second, 60 * CREDIT, now=NOW + 7)
    assert a[-1].idempotency_key == b[-1].idempotency_key != ""
    assert a[-1].event_id != b[-1].event_id
    sms = refilling()
    sms.balance_type = BalanceType.SMS
    assert cross(sms, 60 * CREDIT)[-1].idempotency_key == f"refill:acme:sms:{MARCH_START}:1"


def test_refill_key_separates_accounts_balances_periods_and_numbers() -> None:
    base = ("acme", BalanceType.VOICE, MARCH_START, 1)
    variants = [
        ("other", BalanceType.VOICE, MARCH_START, 1),
        ("acme", BalanceType.SMS, MARCH_START, 1),
        ("acme", BalanceType.VOICE, APRIL_START, 1),
        ("acme", BalanceType.VOICE, MARCH_START, 2),
    ]
    keys = {refill_key(*base), *(refill_key(*v) for v in variants)}
    assert len(keys) == 5
    assert refill_key(*base) == refill_key("acme", BalanceType.VOICE, MARCH_START, 1)


def test_target_balance_refills_what_brings_the_balance_back_to_target() -> None:
    state = refilling(target_balance_micros=1_000 * CREDIT)
    events = cross(state, 110 * CREDIT)
    assert events[-1].type is EventType.REFILL_REQUESTED
    assert events[-1].amount_micros == 960 * CREDIT  # 1,000 target - 40 left; amount_micros ignored


@pytest.mark.parametrize(
    "refill",
    [
        RefillSettings(enabled=False, threshold_micros=100 * CREDIT, amount_micros=5 * CREDIT, max_per_period=3),
        RefillSettings(enabled=True, threshold_micros=100 * CREDIT, amount_micros=5 * CREDIT, max_per_period=0),
        RefillSettings(enabled=True, threshold_micros=0, amount_micros=5 * CREDIT, max_per_period=3),
        None,
    ],
)
def test_no_refill_when_off_capped_at_zero_or_without_threshold(refill: RefillSettings | None) -> None:
    state = wallet(purchased=150 * CREDIT, refill=refill)
    assert cross(state, 149 * CREDIT) == []
    assert state.refills_this_period == 0


def test_refill_threshold_and_low_balance_threshold_are_independent() -> None:
    refill = RefillSettings(enabled=True, threshold_micros=50 * CREDIT, amount_micros=100 * CREDIT, max_per_period=1)
    state = wallet(purchased=150 * CREDIT, refill=refill, low_balance_threshold_micros=100 * CREDIT)
    assert [e.type for e in cross(state, 60 * CREDIT)] == [EventType.LOW_BALANCE]
    assert [e.type for e in cross(state, 60 * CREDIT)] == [EventType.REFILL_REQUESTED]


def test_walletless_account_is_alerted_on_its_limit() -> None:
    state = wallet(has_wallet=False, usage_limit_micros=500 * CREDIT, low_balance_threshold_micros=50 * CREDIT)
    state.used_micros = 400 * CREDIT
    (event,) = cross(state, 60 * CREDIT)
    assert (event.type, event.amount_micros) == (EventType.LOW_BALANCE, 40 * CREDIT)


def test_no_alerts_without_a_level_before() -> None:
    state = wallet(purchased=150 * CREDIT, low_balance_threshold_micros=100 * CREDIT)
    state.debit(100 * CREDIT)
    assert state.alerts(None, NOW) == []


@given(
    start=st.integers(0, 1_000 * CREDIT),
    costs=st.lists(st.integers(0, 200 * CREDIT), max_size=20),
    threshold=st.integers(1, 1_000 * CREDIT),
)
def test_debits_without_top_ups_cross_each_threshold_at_most_once(start: int, costs: list[int], threshold: int) -> None:
    refill = RefillSettings(enabled=True, threshold_micros=threshold, amount_micros=1, max_per_period=10)
    state = wallet(purchased=start, refill=refill, low_balance_threshold_micros=threshold)
    events: list[EventRecord] = []
    for cost in costs:
        cost = min(cost, state.purchased_micros)
        events += cross(state, cost)
    crossed = start >= threshold > state.purchased_micros
    assert len(events_of(events, EventType.LOW_BALANCE)) == int(crossed)
    assert len(events_of(events, EventType.REFILL_REQUESTED)) == int(crossed)
    assert state.refills_this_period == int(crossed)


# -- the usage limit --------------------------------------------------------------------------


def test_limit_reached_fires_once_per_period() -> None:
    state = wallet(free=10 * CREDIT, usage_limit_micros=500 * CREDIT, used=500 * CREDIT)
    (event,) = state.limit_reached(NOW)
    assert (event.type, event.amount_micros, event.account_id) == (EventType.LIMIT_REACHED, 500 * CREDIT, "acme")
    assert state.limit_reached(NOW + 1) == []
    assert state.limit_reached(NOW + 2) == []
    state.roll_period(APRIL_START)
    assert [e.type for e in state.limit_reached(APRIL_START + 1)] == [EventType.LIMIT_REACHED]
    assert state.limit_reached(APRIL_START + 2) == []
