"""Agencies, clients and plans, and what they imply for wallets, payers and prices."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from creditd.domain.money import sms_cost
from creditd.domain.rates import PLATFORM_FREE_SMS_MICROS, PLATFORM_FREE_VOICE_MICROS, RateCard
from creditd.domain.records import BalanceType, DenyReason
from creditd.domain.wallet import Constraint, RefillSettings, WalletConfig


class AccountKind(enum.IntEnum):
    # Values match creditd.v1.AccountKind.
    AGENCY = 1
    CLIENT = 2


class BillingMode(enum.IntEnum):
    # Values match creditd.v1.BillingMode.
    NONE = 0  # agencies
    REBILLING = 1
    AGENCY_PAID = 2


class Direction(enum.IntEnum):
    # Values match creditd.v1.Direction.
    INBOUND = 1
    OUTBOUND = 2


class Channel(enum.IntEnum):
    # Values match creditd.v1.Channel.
    VOICE = 1
    SMS = 2


@dataclass
class BalanceSettings:
    refill: RefillSettings = field(default_factory=RefillSettings)
    low_balance_threshold_micros: int = 0


@dataclass
class Plan:
    agency_id: str
    plan_id: str
    free_voice_micros: int = 0
    free_sms_micros: int = 0
    rates: RateCard = field(default_factory=RateCard)
    usage_limit_micros: int = 0  # per balance and period; 0: none
    max_concurrent_sessions: int = 0  # 0: none

    def free_micros(self, balance_type: BalanceType) -> int:
        return self.free_voice_micros if balance_type is BalanceType.VOICE else self.free_sms_micros


@dataclass
class Account:
    account_id: str
    kind: AccountKind
    agency_id: str  # an agency's is its own id
    display_name: str = ""
    plan_id: str = ""
    billing_mode: BillingMode = BillingMode.NONE
    inbound_active: bool = True
    outbound_active: bool = True
    anchor_day: int = 1
    # Agencies: the free allowance the platform gives and the prices the agency pays it.
    free_voice_micros: int = PLATFORM_FREE_VOICE_MICROS
    free_sms_micros: int = PLATFORM_FREE_SMS_MICROS
    platform_rates: RateCard | None = None
    settings: dict[BalanceType, BalanceSettings] = field(default_factory=dict)
    created_at: float = 0.0

    @property
    def is_agency(self) -> bool:
        return self.kind is AccountKind.AGENCY

    @property
    def has_wallet(self) -> bool:
        return self.is_agency or self.billing_mode is BillingMode.REBILLING

    def subscription_active(self, direction: Direction) -> bool:
        return self.inbound_active if direction is Direction.INBOUND else self.outbound_active

    def balance_settings(self, balance_type: BalanceType) -> BalanceSettings:
        return self.settings.get(balance_type) or BalanceSettings()

    def wallet_config(self, balance_type: BalanceType, plan: Plan | None) -> WalletConfig:
        """The wallet rules of this account's balance: allowance, limit, wallet or not."""
        settings = self.balance_settings(balance_type)
        if self.is_agency:
            allowance = self.free_voice_micros if balance_type is BalanceType.VOICE else self.free_sms_micros
            limit = 0
        else:
            if plan is None:
                raise ValueError(f"client {self.account_id} needs its plan")
            allowance = plan.free_micros(balance_type) if self.has_wallet else 0
            limit = plan.usage_limit_micros
        return WalletConfig(
            has_wallet=self.has_wallet,
            free_allowance_micros=allowance,
            usage_limit_micros=limit,
            anchor_day=self.anchor_day,
            refill=settings.refill,
            low_balance_threshold_micros=settings.low_balance_threshold_micros,
        )


@dataclass(frozen=True)
class Parties:
    client: Account
    agency: Account
    plan: Plan
    platform_rates: RateCard

    @property
    def agency_id(self) -> str:
        return self.agency.account_id

    def subscription_active(self, direction: Direction) -> bool:
        return self.client.subscription_active(direction) and self.agency.subscription_active(direction)

    def voice_rates(self, provider: str) -> dict[str, int]:
        """Micro-credits per minute for each payer: the client at its plan's price, the agency
        at the platform's."""
        return {
            self.client.account_id: self.plan.rates.voice_rate(provider),
            self.agency.account_id: self.platform_rates.voice_rate(provider),
        }

    def sms_costs(self, country: str, segments: int) -> dict[str, int]:
        return {
            self.client.account_id: sms_cost(self.plan.rates.sms_rate(country), segments),
            self.agency.account_id: sms_cost(self.platform_rates.sms_rate(country), segments),
        }

    def deny_reason(self, limited_by: tuple[str, Constraint] | None) -> DenyReason:
        if limited_by is None:
            return DenyReason.NONE
        account_id, constraint = limited_by
        if constraint is Constraint.LIMIT:
            return DenyReason.USAGE_LIMIT_REACHED
        if account_id == self.agency.account_id:
            return DenyReason.AGENCY_CREDITS_EXHAUSTED
        return DenyReason.CLIENT_CREDITS_EXHAUSTED


class Role(enum.IntEnum):
    # Values match creditd.v1.Role.
    PLATFORM_ADMIN = 1
    AGENCY_ADMIN = 2
    WORKER = 3
    READER = 4


@dataclass
class ApiKey:
    key_id: str
    role: Role
    account_id: str  # "" for a platform admin
    secret_sha256: str  # secrets are random 256-bit strings, so a plain hash stores them safely
    description: str = ""
    created_at: float = 0.0
    revoked_at: float | None = None
