"""Agencies, plans, clients, subscriptions, balance settings and API keys."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import replace

from creditd.domain.accounts import (
    Account,
    AccountKind,
    ApiKey,
    BalanceSettings,
    BillingMode,
    Plan,
    Role,
)
from creditd.domain.records import BalanceType, EntryKind, LedgerRecord, new_id
from creditd.domain.wallet import RefillSettings
from creditd.engine.context import Context
from creditd.errors import FailedPrecondition, InvalidArgument, NotFound, quote

PLAN_FIELDS = frozenset(
    {
        "free_voice_micros",
        "free_sms_micros",
        "voice_rates",
        "default_voice_micros_per_minute",
        "sms_rates",
        "default_sms_micros_per_segment",
        "usage_limit_micros",
        "max_concurrent_sessions",
    }
)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def key_id_of(secret: str) -> str:
    """Secrets look like "cdk_<key id>_<random>"; the id is how a key is found."""
    parts = secret.split("_")
    return parts[1] if len(parts) == 3 and parts[0] == "cdk" else ""


class Accounts:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    # -- agencies and clients ----------------------------------------------------------

    async def create_agency(self, account: Account) -> Account:
        account = replace(account, kind=AccountKind.AGENCY, agency_id=account.account_id, created_at=self.ctx.now())
        await self._create(account, None)
        return account

    async def create_client(self, account: Account) -> Account:
        await self._agency(account.agency_id)
        if account.billing_mode not in (BillingMode.REBILLING, BillingMode.AGENCY_PAID):
            raise InvalidArgument("billing_mode must be REBILLING or AGENCY_PAID", "billing_mode")
        plan = await self.ctx.catalog.plan(account.agency_id, account.plan_id)
        account = replace(account, kind=AccountKind.CLIENT, created_at=self.ctx.now())
        await self._create(account, plan)
        return account

    async def _create(self, account: Account, plan: Plan | None) -> None:
        """Durable first (the account and its first free allowance), then the hot wallets."""
        now = self.ctx.now()
        allowances = []
        for balance_type in BalanceType:
            config = account.wallet_config(balance_type, plan)
            if config.free_allowance_micros:
                allowances.append(
                    LedgerRecord(
                        entry_id=new_id(),
                        account_id=account.account_id,
                        balance_type=balance_type,
                        kind=EntryKind.FREE_ALLOWANCE,
                        amount_micros=config.free_allowance_micros,
                        free_micros=config.free_allowance_micros,
                        purchased_micros=0,
                        usage_micros=0,
                        created_at=now,
                    )
                )
        await self.ctx.db.insert_account(account, allowances)
        self.ctx.catalog.put(account)
        await self.configure_wallets(account, plan, created=True)
        for entry in allowances:
            await self.ctx.store.apply_topup(account.agency_id, entry, now)

    async def configure_wallets(self, account: Account, plan: Plan | None, *, created: bool = False) -> None:
        """The account's wallets in the hot store; `created`: the account is new (a new
        agency's wallets mark its state present in the store)."""
        for balance_type in BalanceType:
            config = account.wallet_config(balance_type, plan)
            await self.ctx.store.configure_wallet(
                account.agency_id,
                account.account_id,
                balance_type,
                config,
                self.ctx.now(),
                new_agency=created and account.is_agency,
            )
        await self.ctx.bus.publish(f"config:{account.account_id}")
        await self.ctx.bus.publish(f"balance:{account.account_id}")

    async def get(self, account_id: str) -> Account:
        return await self.ctx.catalog.account(account_id)

    async def list_accounts(
        self, agency_id: str | None, page_size: int, after: str | None
    ) -> tuple[list[Account], str | None]:
        """A page of the agency's clients (None: of the agencies) by id, and the token of the next."""
        if agency_id is not None:
            await self._agency(agency_id)
        found = await self.ctx.db.page_accounts(agency_id, page_size + 1, after)
        return found[:page_size], found[page_size - 1].account_id if len(found) > page_size else None

    async def _agency(self, agency_id: str) -> Account:
        agency = await self.ctx.catalog.account(agency_id)
        if not agency.is_agency:
            raise FailedPrecondition(f"{agency_id} is not an agency", "NOT_AN_AGENCY", agency_id=agency_id)
        return agency

    async def update_subscription(self, account_id: str, inbound: bool | None, outbound: bool | None) -> Account:
        account = await self.ctx.catalog.account(account_id)
        if inbound is not None:
            account = replace(account, inbound_active=inbound)
        if outbound is not None:
            account = replace(account, outbound_active=outbound)
        await self._save(account)
        await self.ctx.bus.publish(f"config:{account_id}")
        return account

    async def set_balance_settings(
        self,
        account_id: str,
        balance_type: BalanceType,
        refill: RefillSettings | None = None,
        low_balance_threshold_micros: int | None = None,
    ) -> Account:
        account = await self.ctx.catalog.account(account_id)
        if not account.has_wallet and refill is not None and refill.enabled:
            raise FailedPrecondition(
                f"{account_id} has no wallet to refill (AGENCY_PAID)", "NO_WALLET", account_id=account_id
            )
        current = account.balance_settings(balance_type)
        settings = BalanceSettings(
            refill=refill if refill is not None else current.refill,
            low_balance_threshold_micros=(
                current.low_balance_threshold_micros
                if low_balance_threshold_micros is None
                else low_balance_threshold_micros
            ),
        )
        account = replace(account, settings={**account.settings, balance_type: settings})
        await self._save(account)
        await self.configure_wallets(account, await self.ctx.catalog.client_plan(account))
        return account

    async def _save(self, account: Account) -> None:
        await self.ctx.db.update_account(account)
        self.ctx.catalog.put(account)

    # -- plans -------------------------------------------------------------------------

    async def create_plan(self, plan: Plan) -> Plan:
        await self._agency(plan.agency_id)
        await self.ctx.db.insert_plan(plan)
        self.ctx.catalog.put_plan(plan)
        return plan

    async def list_plans(self, agency_id: str, page_size: int, after: str | None) -> tuple[list[Plan], str | None]:
        """A page of the agency's plans by id, and the token of the next page (None: last)."""
        await self._agency(agency_id)
        found = await self.ctx.db.page_plans(agency_id, page_size + 1, after)
        return found[:page_size], found[page_size - 1].plan_id if len(found) > page_size else None

    async def get_plan(self, agency_id: str, plan_id: str) -> Plan:
        return await self.ctx.catalog.plan(agency_id, plan_id)

    async def update_plan(self, changes: Plan, fields: list[str]) -> Plan:
        unknown = sorted(set(fields) - PLAN_FIELDS)
        if not fields or unknown:
            raise InvalidArgument(
                f"update_mask must name plan fields from {sorted(PLAN_FIELDS)}",
                "update_mask",
                unknown=quote(",".join(unknown), 64),
            )
        plan = await self.ctx.catalog.plan(changes.agency_id, changes.plan_id)
        rates = plan.rates
        values: dict[str, object] = {}
        for name in fields:
            if name == "voice_rates":
                rates = replace(rates, voice=changes.rates.voice)
            elif name == "default_voice_micros_per_minute":
                rates = replace(rates, default_voice=changes.rates.default_voice)
            elif name == "sms_rates":
                rates = replace(rates, sms=changes.rates.sms)
            elif name == "default_sms_micros_per_segment":
                rates = replace(rates, default_sms=changes.rates.default_sms)
            else:
                values[name] = getattr(changes, name)
        plan = replace(plan, rates=rates, **values)  # type: ignore[arg-type]
        await self.ctx.db.update_plan(plan)
        self.ctx.catalog.put_plan(plan)
        for client_id in await self._clients_of(plan):
            client = await self.ctx.catalog.account(client_id)
            await self.configure_wallets(client, plan)
        await self.ctx.bus.publish(f"plan:{plan.agency_id}:{plan.plan_id}")
        return plan

    async def _clients_of(self, plan: Plan) -> list[str]:
        return [
            a.account_id
            for a in await self.ctx.db.list_accounts()
            if a.agency_id == plan.agency_id and a.plan_id == plan.plan_id
        ]

    # -- API keys ----------------------------------------------------------------------

    async def create_api_key(self, role: Role, account_id: str, description: str) -> tuple[ApiKey, str]:
        if role is Role.PLATFORM_ADMIN:
            account_id = ""
        else:
            account = await self.ctx.catalog.account(account_id)
            if role in (Role.AGENCY_ADMIN, Role.WORKER) and not account.is_agency:
                raise FailedPrecondition(
                    "agency admin and worker keys are scoped to an agency",
                    "NOT_AN_AGENCY",
                    account_id=account_id,
                )
        key_id = secrets.token_hex(8)
        secret = f"cdk_{key_id}_{secrets.token_urlsafe(32).replace('_', '-')}"
        key = ApiKey(key_id, role, account_id, hash_secret(secret), description, self.ctx.now())
        await self.ctx.db.insert_api_key(key)
        return key, secret

    async def revoke_api_key(self, key_id: str) -> ApiKey:
        key = await self.ctx.db.revoke_api_key(key_id, self.ctx.now())
        if key is None:
            raise NotFound(f"API key {key_id!r} does not exist", "API_KEY_NOT_FOUND", key_id=key_id)
        await self.ctx.bus.publish(f"apikey:{key_id}")
        return key

    async def list_api_keys(self, account_id: str | None) -> list[ApiKey]:
        return await self.ctx.db.list_api_keys(account_id)
