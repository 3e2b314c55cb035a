"""Price lists: what a client pays its agency (a plan) or an agency pays the platform."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from creditd.domain.money import MICROS_PER_CREDIT, credits

# Providers the platform knows today; rates accept any other name as well.
VOICE_PROVIDERS = ("deepgram", "cartesia", "elevenlabs", "voice_clone")

PLATFORM_FREE_VOICE_MICROS = 300 * MICROS_PER_CREDIT
PLATFORM_FREE_SMS_MICROS = 83 * MICROS_PER_CREDIT
PLATFORM_VOICE_MICROS_PER_MINUTE = MICROS_PER_CREDIT
US_SMS_MICROS_PER_SEGMENT = credits("0.166")


def normalize_country(country: str) -> str:
    return country.strip().upper()


def normalize_provider(provider: str) -> str:
    return provider.strip().lower()


@dataclass(frozen=True)
class RateCard:
    voice: Mapping[str, int] = field(default_factory=dict)
    default_voice: int = PLATFORM_VOICE_MICROS_PER_MINUTE
    sms: Mapping[str, int] = field(default_factory=dict)
    default_sms: int = US_SMS_MICROS_PER_SEGMENT

    def voice_rate(self, provider: str) -> int:
        """Micro-credits per minute for a provider, else the default."""
        return self.voice.get(normalize_provider(provider), self.default_voice)

    def sms_rate(self, country: str) -> int:
        """Micro-credits per segment for a destination country, else the default."""
        return self.sms.get(normalize_country(country), self.default_sms)


PLATFORM_RATES = RateCard(
    voice={},
    default_voice=PLATFORM_VOICE_MICROS_PER_MINUTE,
    sms={"US": US_SMS_MICROS_PER_SEGMENT, "CA": US_SMS_MICROS_PER_SEGMENT},
    default_sms=US_SMS_MICROS_PER_SEGMENT,
)
