"""Price lists: platform defaults and plan rate cards (SPEC section 2)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from creditd.domain.money import MICROS_PER_CREDIT, affordable_seconds, sms_cost, voice_cost
from creditd.domain.rates import (
    PLATFORM_FREE_SMS_MICROS,
    PLATFORM_FREE_VOICE_MICROS,
    PLATFORM_RATES,
    PLATFORM_VOICE_MICROS_PER_MINUTE,
    US_SMS_MICROS_PER_SEGMENT,
    VOICE_PROVIDERS,
    RateCard,
    normalize_country,
    normalize_provider,
)

PLAN = RateCard(
    voice={"elevenlabs": 1_500_000, "deepgram": 800_000},
    default_voice=1_200_000,
    sms={"US": 200_000, "GB": 450_000},
    default_sms=600_000,
)


def test_platform_gives_300_free_voice_credits_and_83_free_sms_credits() -> None:
    assert PLATFORM_FREE_VOICE_MICROS == 300_000_000
    assert PLATFORM_FREE_SMS_MICROS == 83_000_000
    # 300 free credits at the platform's 1 credit/minute are exactly 18,000 seconds.
    rate = PLATFORM_RATES.voice_rate("deepgram")
    assert affordable_seconds(rate, PLATFORM_FREE_VOICE_MICROS) == 18_000


@pytest.mark.parametrize("provider", [*VOICE_PROVIDERS, "some_new_vendor"])
def test_platform_charges_one_credit_per_minute_for_every_provider(provider: str) -> None:
    assert PLATFORM_RATES.voice_rate(provider) == PLATFORM_VOICE_MICROS_PER_MINUTE == MICROS_PER_CREDIT
    assert voice_cost(PLATFORM_RATES.voice_rate(provider), 2) == 33_334


@pytest.mark.parametrize("country", ["US", "CA", "us", " ca "])
def test_platform_charges_0_166_credit_per_us_and_ca_segment(country: str) -> None:
    assert PLATFORM_RATES.sms_rate(country) == US_SMS_MICROS_PER_SEGMENT == 166_000


def test_83_free_sms_credits_pay_500_us_segments_at_platform_rates() -> None:
    rate = PLATFORM_RATES.sms_rate("us")
    assert sms_cost(rate, 500) == PLATFORM_FREE_SMS_MICROS
    assert sms_cost(rate, 501) > PLATFORM_FREE_SMS_MICROS
    assert PLATFORM_FREE_SMS_MICROS // rate == 500


def test_a_plan_charging_1_5_credits_per_minute_for_elevenlabs() -> None:
    rate = PLAN.voice_rate("elevenlabs")
    assert rate == 1_500_000
    assert voice_cost(rate, 60) == 1_500_000
    assert voice_cost(rate, 2) == 50_000
    assert voice_cost(rate, 1) == 25_000


@pytest.mark.parametrize("spelling", ["elevenlabs", "ElevenLabs", "ELEVENLABS", "  elevenLabs\t"])
def test_provider_lookup_normalizes_case_and_whitespace(spelling: str) -> None:
    assert PLAN.voice_rate(spelling) == 1_500_000


@pytest.mark.parametrize("provider", ["cartesia", "voice_clone", "brand_new", ""])
def test_unlisted_provider_falls_back_to_the_plan_default(provider: str) -> None:
    assert PLAN.voice_rate(provider) == 1_200_000


@pytest.mark.parametrize(("country", "rate"), [("gb", 450_000), (" Gb ", 450_000), ("US", 200_000), ("us", 200_000)])
def test_country_lookup_normalizes_case_and_whitespace(country: str, rate: int) -> None:
    assert PLAN.sms_rate(country) == rate


@pytest.mark.parametrize("country", ["FR", "de", "CA"])
def test_unlisted_country_falls_back_to_the_plan_default(country: str) -> None:
    assert PLAN.sms_rate(country) == 600_000


def test_an_empty_rate_card_prices_like_the_platform() -> None:
    card = RateCard()
    assert card.voice_rate("elevenlabs") == 1_000_000
    assert card.sms_rate("JP") == 166_000


def test_rate_cards_are_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PLATFORM_RATES.default_voice = 5  # type: ignore[misc]


@given(
    name=st.sampled_from(VOICE_PROVIDERS),
    flips=st.lists(st.booleans(), min_size=12, max_size=12),
    pad=st.sampled_from(["", " ", "\t", "  \n"]),
)
def test_any_casing_of_a_listed_provider_finds_its_rate(name: str, flips: list[bool], pad: str) -> None:
    card = RateCard(voice={p: 100_000 * (i + 2) for i, p in enumerate(VOICE_PROVIDERS)}, default_voice=1)
    spelled = "".join(c.upper() if flip else c for c, flip in zip(name, flips, strict=False))
    assert normalize_provider(pad + spelled + pad) == name
    assert card.voice_rate(pad + spelled + pad) == 100_000 * (VOICE_PROVIDERS.index(name) + 2)


@given(country=st.sampled_from(["us", "Us", "uS", "US", " us ", "US\n"]))
def test_country_normalization_is_upper_iso_code(country: str) -> None:
    assert normalize_country(country) == "US"
