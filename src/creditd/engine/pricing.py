"""Who pays for a client's usage, at which price, and why a payer says no."""

from __future__ import annotations

from dataclasses import dataclass

from creditd.domain.accounts import Account, Direction, Plan
from creditd.domain.rates import RateCard
from creditd.domain.records import DenyReason
from creditd.domain.wallet import Constraint
from creditd.engine.context import Context
from creditd.errors import FailedPrecondition


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
            self.client.account_id: self.plan.rates.sms_rate(country) * segments,
            self.agency.account_id: self.platform_rates.sms_rate(country) * segments,
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


async def parties(ctx: Context, client_id: str) -> Parties:
    client = await ctx.catalog.account(client_id)
    if client.is_agency:
        raise FailedPrecondition(
            f"{client_id} is an agency; sessions belong to clients", "NOT_A_CLIENT", account_id=client_id
        )
    agency = await ctx.catalog.account(client.agency_id)
    plan = await ctx.catalog.plan(client.agency_id, client.plan_id)
    return Parties(client, agency, plan, agency.platform_rates or ctx.settings.platform_rates)
