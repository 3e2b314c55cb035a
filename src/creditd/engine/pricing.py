"""The parties of a client's usage, as the catalog knows them now."""

from __future__ import annotations

from creditd.domain.accounts import Parties
from creditd.engine.context import Context
from creditd.errors import FailedPrecondition


async def parties(ctx: Context, client_id: str) -> Parties:
    known = ctx.catalog.parties.get(client_id)
    if known is not None:
        return known
    client = await ctx.catalog.account(client_id)
    if client.is_agency:
        raise FailedPrecondition(
            f"{client_id} is an agency; sessions belong to clients", "NOT_A_CLIENT", account_id=client_id
        )
    agency = await ctx.catalog.account(client.agency_id)
    plan = await ctx.catalog.plan(client.agency_id, client.plan_id)
    found = Parties(client, agency, plan, agency.platform_rates or ctx.settings.platform_rates)
    ctx.catalog.parties[client_id] = found
    return found
