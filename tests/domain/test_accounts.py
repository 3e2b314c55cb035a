"""Agencies, clients, plans: what they imply for wallets and payers (SPEC section 2)."""

from __future__ import annotations

import calendar
from datetime import datetime

import pytest

from creditd.domain.accounts import (
    Account,
    AccountKind,
    BalanceSettings,
    BillingMode,
    Direction,
    Parties,
    Plan,
)
from creditd.domain.money import voice_cost
from creditd.domain.rates import PLATFORM_RATES, RateCard
from creditd.domain.records import BalanceType, DenyReason, EntryKind, LedgerRecord
from creditd.domain.wallet import Constraint, RefillSettings, new_wallet

CREDIT = 1_000_000
NOW = calendar.timegm(datetime(2024, 3, 10).timetuple())
APRIL_START = calendar.timegm(datetime(2024, 4, 1).timetuple())

PLAN = Plan(
    agency_id="agency",
    plan_id="gold",
    free_voice_micros=200 * CREDIT,
    free_sms_micros=50 * CREDIT,
    rates=RateCard(voice={"elevenlabs": 1_500_000}, default_voice=1_200_000, sms={"GB": 400_000}, default_sms=200_000),
    usage_limit_micros=500 * CREDIT,
)


def agency(**fields: object) -> Account:
    return Account(account_id="agency", kind=AccountKind.AGENCY, agency_id="agency", **fields)  # type: ignore[arg-type]


def client(mode: BillingMode, **fields: object) -> Account:
    return Account(
        account_id="client",
        kind=AccountKind.CLIENT,
        agency_id="agency",
        plan_id="gold",
        billing_mode=mode,
        **fields,  # type: ignore[arg-type]
    )


def test_agency_wallet_has_the_platform_free_allowance_and_no_limit() -> None:
    account = agency(anchor_day=7)
    voice = account.wallet_config(BalanceType.VOICE, None)
    sms = account.wallet_config(BalanceType.SMS, None)
    assert (voice.has_wallet, voice.free_allowance_micros, voice.usage_limit_micros) == (True, 300 * CREDIT, 0)
    assert (sms.has_wallet, sms.free_allowance_micros, sms.usage_limit_micros) == (True, 83 * CREDIT, 0)
    assert voice.anchor_day == sms.anchor_day == 7
    # A plan never applies to the agency itself.
    assert account.wallet_config(BalanceType.VOICE, PLAN).usage_limit_micros == 0


def test_agency_with_overridden_allowances_including_zero() -> None:
    trial = agency(free_voice_micros=0, free_sms_micros=10 * CREDIT)
    assert trial.wallet_config(BalanceType.VOICE, None).free_allowance_micros == 0
    assert trial.wallet_config(BalanceType.SMS, None).free_allowance_micros == 10 * CREDIT


def test_rebilling_client_gets_its_plan_allowance_and_limit() -> None:
    account = client(BillingMode.REBILLING)
    assert account.has_wallet
    voice = account.wallet_config(BalanceType.VOICE, PLAN)
    sms = account.wallet_config(BalanceType.SMS, PLAN)
    assert (voice.has_wallet, voice.free_allowance_micros, voice.usage_limit_micros) == (
        True,
        200 * CREDIT,
        500 * CREDIT,
    )
    assert (sms.has_wallet, sms.free_allowance_micros, sms.usage_limit_micros) == (True, 50 * CREDIT, 500 * CREDIT)


def test_agency_paid_client_has_no_wallet_no_allowance_and_the_plan_limit() -> None:
    account = client(BillingMode.AGENCY_PAID)
    assert not account.has_wallet
    for balance_type in BalanceType:
        config = account.wallet_config(balance_type, PLAN)
        assert (config.has_wallet, config.free_allowance_micros, config.usage_limit_micros) == (
            False,
            0,
            500 * CREDIT,
        )


def test_a_client_needs_its_plan() -> None:
    with pytest.raises(ValueError):
        client(BillingMode.REBILLING).wallet_config(BalanceType.VOICE, None)


def test_agency_gets_300_free_and_gives_its_client_200_the_client_sees_200() -> None:
    the_agency, the_client = agency(), client(BillingMode.REBILLING)
    agency_wallet = new_wallet("agency", BalanceType.VOICE, the_agency.wallet_config(BalanceType.VOICE, None), NOW)
    client_wallet = new_wallet("client", BalanceType.VOICE, the_client.wallet_config(BalanceType.VOICE, PLAN), NOW)
    grants = agency_wallet.roll_period(APRIL_START) + client_wallet.roll_period(APRIL_START)
    assert [(r.account_id, r.amount_micros) for r in grants if isinstance(r, LedgerRecord)] == [
        ("agency", 300 * CREDIT),
        ("client", 200 * CREDIT),
    ]
    assert all(r.kind is EntryKind.FREE_ALLOWANCE for r in grants if isinstance(r, LedgerRecord))
    assert agency_wallet.free_micros == 300 * CREDIT
    assert client_wallet.free_micros == 200 * CREDIT
    assert client_wallet.headroom() == (200 * CREDIT, Constraint.WALLET)


def test_agency_paid_client_covered_by_300_free_plus_200_purchased_stops_at_500() -> None:
    """SPEC: "300 free + 200 purchased = 500 covered" and a 500-credit limit for the client."""
    the_agency, the_client = agency(), client(BillingMode.AGENCY_PAID)
    agency_wallet = new_wallet("agency", BalanceType.VOICE, the_agency.wallet_config(BalanceType.VOICE, None), NOW)
    client_limit = new_wallet("client", BalanceType.VOICE, the_client.wallet_config(BalanceType.VOICE, PLAN), NOW)
    agency_wallet.roll_period(APRIL_START)
    client_limit.roll_period(APRIL_START)
    agency_wallet.credit(200 * CREDIT, to_free=False)
    assert agency_wallet.headroom() == (500 * CREDIT, Constraint.WALLET)
    assert client_limit.headroom() == (500 * CREDIT, Constraint.LIMIT)

    # 500 minutes at the platform's 1 credit/minute, in 10-minute calls.
    for _ in range(50):
        cost = voice_cost(PLATFORM_RATES.voice_rate("deepgram"), 600)
        agency_wallet.reserve(cost)
        client_limit.reserve(cost)
        agency_wallet.settle(cost, cost)
        client_limit.settle(cost, cost)

    assert (agency_wallet.free_micros, agency_wallet.purchased_micros) == (0, 0)
    assert client_limit.used_micros == 500 * CREDIT
    assert agency_wallet.headroom() == (0, Constraint.WALLET)
    assert client_limit.headroom() == (0, Constraint.LIMIT)
    # Buying more does not help while the limit holds: the AI stays stopped.
    agency_wallet.credit(100 * CREDIT, to_free=False)
    assert agency_wallet.headroom() == (100 * CREDIT, Constraint.WALLET)
    assert client_limit.headroom() == (0, Constraint.LIMIT)


@pytest.mark.parametrize(
    ("inbound", "outbound"),
    [(True, True), (True, False), (False, True), (False, False)],
)
def test_subscription_is_checked_per_direction(inbound: bool, outbound: bool) -> None:
    for account in (
        agency(inbound_active=inbound, outbound_active=outbound),
        client(BillingMode.REBILLING, inbound_active=inbound, outbound_active=outbound),
    ):
        assert account.subscription_active(Direction.INBOUND) is inbound
        assert account.subscription_active(Direction.OUTBOUND) is outbound


def test_balance_settings_flow_into_the_wallet_config_per_balance_type() -> None:
    refill = RefillSettings(enabled=True, threshold_micros=50 * CREDIT, amount_micros=100 * CREDIT, max_per_period=3)
    account = client(
        BillingMode.REBILLING,
        settings={BalanceType.SMS: BalanceSettings(refill=refill, low_balance_threshold_micros=20 * CREDIT)},
    )
    sms = account.wallet_config(BalanceType.SMS, PLAN)
    assert sms.refill == refill
    assert sms.low_balance_threshold_micros == 20 * CREDIT
    voice = account.wallet_config(BalanceType.VOICE, PLAN)
    assert voice.refill == RefillSettings()
    assert voice.refill is not None and not voice.refill.enabled
    assert voice.low_balance_threshold_micros == 0


def test_plan_free_micros_per_balance_type() -> None:
    assert PLAN.free_micros(BalanceType.VOICE) == 200 * CREDIT
    assert PLAN.free_micros(BalanceType.SMS) == 50 * CREDIT


def test_rebilling_client_pays_plan_rates_and_the_agency_pays_platform_rates() -> None:
    party = Parties(client(BillingMode.REBILLING), agency(), PLAN, PLATFORM_RATES)
    # A 60-second elevenlabs call: 1.5 credits from the client, 1 credit from the agency.
    rates = party.voice_rates("ElevenLabs")
    assert {a: voice_cost(r, 60) for a, r in rates.items()} == {"client": 1_500_000, "agency": 1_000_000}
    assert party.sms_costs("gb", 2) == {"client": 800_000, "agency": 332_000}


def test_an_agency_with_its_own_platform_price_pays_that_price() -> None:
    special = RateCard(voice={"elevenlabs": 900_000}, default_voice=800_000)
    party = Parties(client(BillingMode.AGENCY_PAID), agency(platform_rates=special), PLAN, special)
    assert party.voice_rates("elevenlabs")["agency"] == 900_000
    assert party.voice_rates("deepgram")["agency"] == 800_000


def test_deny_reasons_name_the_payer_and_the_rule() -> None:
    party = Parties(client(BillingMode.REBILLING), agency(), PLAN, PLATFORM_RATES)
    assert party.deny_reason(("client", Constraint.WALLET)) is DenyReason.CLIENT_CREDITS_EXHAUSTED
    assert party.deny_reason(("agency", Constraint.WALLET)) is DenyReason.AGENCY_CREDITS_EXHAUSTED
    assert party.deny_reason(("client", Constraint.LIMIT)) is DenyReason.USAGE_LIMIT_REACHED
    assert party.deny_reason(None) is DenyReason.NONE


def test_account_kinds() -> None:
    assert agency().is_agency and agency().has_wallet
    assert not client(BillingMode.REBILLING).is_agency
    assert client(BillingMode.REBILLING).has_wallet
    assert not client(BillingMode.AGENCY_PAID).has_wallet
