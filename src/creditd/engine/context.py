"""What every part of the engine shares: settings, stores, the catalog cache and the bus."""

from __future__ import annotations

from dataclasses import dataclass, field

from creditd.config import Settings
from creditd.db import Database
from creditd.domain.accounts import Account, Parties, Plan
from creditd.engine.clock import Clock, RealClock
from creditd.engine.health import Status
from creditd.errors import NotFound
from creditd.store.base import HotStore
from creditd.store.bus import LocalBus


class Catalog:
    """Accounts and plans, cached in process so the hot path never waits on the database.

    Entries are dropped when a "config:<account>" notification arrives and read again on
    next use, so every replica sees an operator's change within one notification.
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._accounts: dict[str, Account] = {}
        self._plans: dict[tuple[str, str], Plan] = {}
        # client id -> the parties of its usage, built once (every change clears them all)
        self.parties: dict[str, Parties] = {}
        # Every agency, for the work done agency by agency (the sweeper, a cluster's loss
        # check): kept when an entry is dropped, and told of agencies created elsewhere
        # through the ids of changed accounts, read again by agency_ids().
        self._agency_ids: set[str] = set()
        self._changed: set[str] = set()

    async def load(self) -> None:
        self.parties.clear()
        self._accounts = {a.account_id: a for a in await self._db.list_accounts()}
        self._plans = {(p.agency_id, p.plan_id): p for p in await self._db.list_plans()}
        self._agency_ids = {a.account_id for a in self._accounts.values() if a.is_agency}
        self._changed.clear()

    def forget(self, account_id: str) -> None:
        self.parties.clear()
        self._changed.add(account_id)
        account = self._accounts.pop(account_id, None)
        if account is not None and account.plan_id:
            self._plans.pop((account.agency_id, account.plan_id), None)

    def forget_plan(self, agency_id: str, plan_id: str) -> None:
        self.parties.clear()
        self._plans.pop((agency_id, plan_id), None)

    def put(self, account: Account) -> None:
        self.parties.clear()
        self._keep(account)

    def _keep(self, account: Account) -> None:
        self._accounts[account.account_id] = account
        if account.is_agency:
            self._agency_ids.add(account.account_id)

    def put_plan(self, plan: Plan) -> None:
        self.parties.clear()
        self._plans[(plan.agency_id, plan.plan_id)] = plan

    async def find(self, account_id: str) -> Account | None:
        account = self._accounts.get(account_id)
        if account is None:
            account = await self._db.get_account(account_id)
            if account is not None:
                self._keep(account)
        return account

    async def account(self, account_id: str) -> Account:
        account = await self.find(account_id)
        if account is None:
            raise NotFound(f"account {account_id!r} does not exist", "ACCOUNT_NOT_FOUND", account_id=account_id)
        return account

    async def find_plan(self, agency_id: str, plan_id: str) -> Plan | None:
        plan = self._plans.get((agency_id, plan_id))
        if plan is None:
            plan = await self._db.get_plan(agency_id, plan_id)
            if plan is not None:
                self._plans[(agency_id, plan_id)] = plan
        return plan

    async def plan(self, agency_id: str, plan_id: str) -> Plan:
        plan = await self.find_plan(agency_id, plan_id)
        if plan is None:
            raise NotFound(
                f"plan {plan_id!r} of agency {agency_id!r} does not exist",
                "PLAN_NOT_FOUND",
                agency_id=agency_id,
                plan_id=plan_id,
            )
        return plan

    async def client_plan(self, client: Account) -> Plan | None:
        return await self.plan(client.agency_id, client.plan_id) if client.plan_id else None

    async def agency_ids(self) -> list[str]:
        """Every agency: those loaded at start or seen since, and those created on another
        replica (whose notification named them), each read once from the database."""
        while self._changed:
            account_id = next(iter(self._changed))
            await self.find(account_id)  # an agency found is kept in the list
            self._changed.discard(account_id)
        return sorted(self._agency_ids)


@dataclass
class Context:
    settings: Settings
    store: HotStore
    db: Database
    bus: LocalBus
    # Wall clock of billing periods and timestamps, and the timers of live sessions.
    clock: Clock = field(default_factory=RealClock)
    catalog: Catalog = field(init=False)
    status: Status = field(init=False)

    def __post_init__(self) -> None:
        self.catalog = Catalog(self.db)
        self.status = Status()

    def now(self) -> float:
        return self.clock.now()
