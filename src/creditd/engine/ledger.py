"""Top-ups, balances, the ledger and events."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Awaitable, Callable

from creditd.domain.accounts import Account
from creditd.domain.records import (
    BalanceType,
    EntryKind,
    EventRecord,
    EventType,
    LedgerRecord,
    TopupKind,
    new_id,
)
from creditd.domain.usage import UsageGroup, UsageTotals
from creditd.domain.wallet import WalletState
from creditd.engine.context import Context
from creditd.errors import FailedPrecondition, NotFound, StoreUnavailable

# Grants are free credits of the current period; everything else is bought and never expires.
_TO_FREE = {TopupKind.GRANT}
APPLY_WAIT_SECONDS = 10.0  # how long a committed top-up waits for the hot store to answer or be rebuilt
APPLY_RETRY_SECONDS = 0.1


def topup_fingerprint(account_id: str, balance_type: BalanceType, amount: int, kind: TopupKind, ref: str) -> str:
    canonical = json.dumps([account_id, int(balance_type), amount, int(kind), ref])
    return hashlib.sha256(canonical.encode()).hexdigest()


class Ledger:
    def __init__(self, ctx: Context, flush: Callable[[], Awaitable[object]] | None = None) -> None:
        self.ctx = ctx
        self._flush = flush

    async def _caught_up(self) -> None:
        """Let a reader see its own usage: move what is pending to the database first."""
        if self._flush is not None:
            with contextlib.suppress(Exception):  # the database answers with what it has
                await self._flush()

    async def topup(
        self,
        account_id: str,
        balance_type: BalanceType,
        amount: int,
        kind: TopupKind,
        idempotency_key: str,
        external_ref: str,
    ) -> tuple[LedgerRecord, WalletState]:
        """Credit an account once per idempotency key; answered only after the database commit."""
        account = await self.ctx.catalog.account(account_id)
        if not self.ctx.status.store_ok:
            # Fail closed before committing: while the hot store is away or being rebuilt,
            # an entry committed now could miss the rebuilt balances until it is retried.
            raise StoreUnavailable("the hot store is unavailable; nothing was credited", store="hot")
        if not account.has_wallet:
            raise FailedPrecondition(
                f"{account_id} is billed to its agency (AGENCY_PAID) and has no wallet to top up",
                "NO_WALLET",
                account_id=account_id,
            )
        now = self.ctx.now()
        to_free = kind in _TO_FREE
        entry = LedgerRecord(
            entry_id=new_id(),
            account_id=account_id,
            balance_type=balance_type,
            kind=EntryKind.TOPUP,
            amount_micros=amount,
            free_micros=amount if to_free else 0,
            purchased_micros=0 if to_free else amount,
            usage_micros=0,
            created_at=now,
            topup_kind=kind,
            idempotency_key=idempotency_key,
            external_ref=external_ref,
        )
        event = EventRecord(
            event_id=new_id(),
            account_id=account_id,
            type=EventType.TOPUP_APPLIED,
            balance_type=balance_type,
            created_at=now,
            amount_micros=amount,
            idempotency_key=idempotency_key,
            attributes={"kind": kind.name, "entry_id": entry.entry_id},
        )
        fingerprint = topup_fingerprint(account_id, balance_type, amount, kind, external_ref)
        original, original_fingerprint, created = await self.ctx.db.insert_topup(
            account.agency_id, entry, fingerprint, event
        )
        if original_fingerprint != fingerprint:
            raise FailedPrecondition(
                "this idempotency_key was used with other parameters",
                "IDEMPOTENCY_KEY_REUSED",
                idempotency_key=idempotency_key,
                entry_id=original.entry_id,
            )
        # Applying an entry twice changes nothing, so a retry also repairs a top-up whose
        # first attempt committed but could not reach the hot store.
        wallet = await self._apply(account.agency_id, original)
        await self.ctx.bus.publish(f"balance:{account_id}")
        await self.ctx.bus.publish(f"credit:{account_id}")
        if created:
            await self.ctx.bus.publish("events")
        return original, wallet

    async def _apply(self, agency_id: str, entry: LedgerRecord) -> WalletState:
        """Credit a committed entry to the hot store. A store that lost its data (or is away)
        is waited for, within APPLY_WAIT_SECONDS: the entry is durable, so once the store
        is rebuilt (which reads it from the database) or answers again, this applies it or
        finds it applied, and the caller hears of a success, not of an error it might not
        retry. Past the wait the answer is UNAVAILABLE; a retry with the same key returns
        the original entry."""
        deadline = time.monotonic() + APPLY_WAIT_SECONDS
        while True:
            try:
                return await self.ctx.store.apply_topup(agency_id, entry, self.ctx.now())
            except StoreUnavailable:
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(APPLY_RETRY_SECONDS)

    async def wallets(self, account_id: str) -> tuple[Account, dict[BalanceType, WalletState]]:
        account = await self.ctx.catalog.account(account_id)
        wallets: dict[BalanceType, WalletState] = {}
        for balance_type in BalanceType:
            wallet = await self.ctx.store.read_wallet(account.agency_id, account_id, balance_type, self.ctx.now())
            if wallet is None:
                raise NotFound(f"no wallet for {account_id}", "ACCOUNT_NOT_FOUND", account_id=account_id)
            wallets[balance_type] = wallet
        return account, wallets

    async def entries(
        self, account_id: str, balance_type: BalanceType | None, page_size: int, cursor: str | None
    ) -> tuple[list[LedgerRecord], str | None]:
        await self.ctx.catalog.account(account_id)
        await self._caught_up()
        return await self.ctx.db.list_ledger(account_id, balance_type, page_size, cursor)

    async def events(self, account_id: str, page_size: int, cursor: str | None) -> tuple[list[EventRecord], str | None]:
        await self.ctx.catalog.account(account_id)
        await self._caught_up()
        return await self.ctx.db.list_events([account_id], page_size, cursor)

    async def usage(
        self,
        account_id: str,
        balance_types: list[BalanceType],
        since_us: int,
        until_us: int,
        groups: list[UsageGroup],
    ) -> list[tuple[tuple[object, ...], UsageTotals]]:
        """The account's usage in [since_us, until_us) per group, ordered by the groups' values."""
        await self.ctx.catalog.account(account_id)
        await self._caught_up()
        totals = await self.ctx.db.usage(account_id, balance_types, since_us, until_us, groups)
        return sorted(totals.items(), key=lambda item: item[0])
