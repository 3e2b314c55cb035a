"""Write-behind of the hot store's outbox to the database, and the rebuild that reverses it.

Crash-loss bound: a balance change reaches the database within one flush interval (plus
the time of one batch write) after it happened in the hot store. If the hot store loses
its memory before that, the rebuild from the database does not know of it: at most that
window of usage is lost, never a top-up (top-ups commit to the database first). Sessions
that were open at the crash are settled as if they used everything they had been granted,
so a lost live call never gives away unpaid seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection

from creditd.aio import raise_if_cancelled
from creditd.domain.accounts import Account, Plan
from creditd.domain.periods import period_bounds_epoch
from creditd.domain.records import BalanceType, EventRecord, EventType, Record, SessionRecord
from creditd.domain.wallet import WalletState
from creditd.engine.context import Context
from creditd.errors import StoreUnavailable
from creditd.store.base import SessionState, SettleRequest

log = logging.getLogger(__name__)
REBUILD_READ_ATTEMPTS = 10


class Flusher:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.oldest_pending: float | None = None  # created time of the oldest unflushed record
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="flusher")

    async def close(self) -> None:
        """Let the flush in progress finish, then move what is left. Cancelling a flush
        midway would leave its transaction to the driver: on SQLite, a write lock that the
        last flush then waits for."""
        self._closing.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.flush()

    def lag_seconds(self) -> float:
        return 0.0 if self.oldest_pending is None else max(0.0, time.time() - self.oldest_pending)

    async def flush(self) -> int:
        """Move everything pending to the database; returns how many records moved.

        A batch smaller than `flush_batch` held everything that was pending when it was
        taken: that is the end. Going on would write what arrived meanwhile a few records at
        a time, each batch a transaction of its own (under steady load, hundreds of
        microseconds a record instead of tens); the next interval takes them together.
        """
        moved = 0
        limit = self.ctx.settings.flush_batch
        store, db = self.ctx.store, self.ctx.db
        while True:
            # A look at the oldest record first, so that an idle outbox costs the database
            # nothing; then the records are taken and written inside the write-behind
            # fence: a rebuild of the hot store never reads the database between the take
            # and the commit. (Only one is looked at: decoding a whole batch twice held the
            # event loop for tens of milliseconds when thousands of calls settled at once.)
            batch = await store.take_records(1)
            if batch:
                self.oldest_pending = _oldest(batch)
                async with db.write_fence():
                    batch = await store.take_records(limit)
                    records = [record for _, record in batch]
                    if records:
                        await db.write_records(records)
            if not batch:
                self.oldest_pending = None
                return moved
            await store.ack_records([record_id for record_id, _ in batch])
            moved += len(batch)
            if any(isinstance(r, EventRecord) for r in records):
                await self.ctx.bus.publish("events")
            if len(batch) < limit:
                self.oldest_pending = None
                return moved

    async def _run(self) -> None:
        while not self._closing.is_set():
            try:
                await self.flush()
            except Exception as exc:  # the records stay in the outbox; try again
                log.warning("write-behind failed, will retry: %s", exc)
            raise_if_cancelled()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.ctx.settings.flush_interval_seconds)


def _oldest(batch: list[tuple[str, Record]]) -> float:
    """When the oldest of these records was made (what the lag metric reports)."""
    return min(getattr(r, "created_at", getattr(r, "updated_at", 0.0)) for _, r in batch)


async def rebuild(ctx: Context, agencies: Collection[str] | None = None) -> int:
    """Load the hot store from the database, then settle sessions nobody is serving anymore:
    all of it, or only the state of `agencies` (a cluster shard that came back empty).

    Returns the number of sessions settled.
    """

    def wanted(agency_id: str) -> bool:
        return agencies is None or agency_id in agencies

    await Flusher(ctx).flush()  # whatever the store still holds belongs in the totals
    # No write-behind of any replica commits what it took from the store before it lost its
    # data (or takes anything) while the database is read and the store loaded: see
    # creditd.db.postgres_writer.
    async with ctx.db.rebuild_fence():
        return await _rebuild(ctx, wanted)


async def _rebuild(ctx: Context, wanted: Callable[[str], bool]) -> int:
    now = ctx.now()
    db = ctx.db
    # Top-ups commit to the database while this runs (on other replicas, or before this one
    # noticed): the totals and the set of applied top-up ids must describe the same
    # top-ups, or a top-up counted in one and not the other is lost or credited twice. They
    # are separate reads, so read them again until no top-up committed in between.
    for _ in range(REBUILD_READ_ATTEMPTS):
        topup_ids = await db.topup_entry_ids()
        totals = await db.wallet_totals()
        open_sessions = await db.open_sessions()
        if set(await db.topup_entry_ids()) == set(topup_ids):
            break
    else:
        raise StoreUnavailable("top-ups keep committing during the rebuild; try again", state="rebuilding")
    reserved = _reserved_by_account(open_sessions)
    wallets: list[tuple[str, WalletState]] = []
    for account in await db.list_accounts():
        if not wanted(account.agency_id):
            continue
        plan = await ctx.catalog.client_plan(account)
        for balance_type in BalanceType:
            wallets.append((account.agency_id, await _wallet(ctx, account, balance_type, plan, totals, reserved)))
    sessions = [
        SessionState(
            session_id=r.session_id,
            agency_id=r.agency_id,
            client_id=r.client_id,
            channel=r.channel,
            direction=r.direction,
            provider=r.provider,
            status=r.status,
            granted_seconds=r.granted_seconds,
            reserved=dict(r.reserved),
            expires_at=now,
            started_at=r.started_at,
        )
        for r in open_sessions
        if wanted(r.agency_id)
    ]
    agency_of = {account_id: agency_id for agency_id, account_id in ((a, w.account_id) for a, w in wallets)}
    applied = [
        (agency_of.get(account_id, ""), entry_id) for account_id, entry_id in topup_ids if account_id in agency_of
    ]
    await ctx.store.load(wallets, sessions, applied)
    for session in sessions:
        # Each session as of the database's last write: a call answered within the
        # write-behind's lag before the loss reads as never answered and is released, as a
        # renewal reserved in that lag is not billed (docs/durability.md).
        await ctx.store.settle(SettleRequest.abandoned(session, now))
    return len(sessions)


async def reconcile(ctx: Context, attempts: int = 3) -> list[str]:
    """Compare the hot store with the ledger, account by account. Returns one line per
    difference (none: they agree to the micro-credit).

    Operations in flight while it runs can show as differences that are gone a moment
    later, so a difference must persist over `attempts` comparisons to be reported.
    """
    differences: list[str] = []
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(0.5)
        differences = await _compare(ctx)
        if not differences:
            break
    return differences


async def _compare(ctx: Context) -> list[str]:
    now = ctx.now()
    accounts = await ctx.db.list_accounts()
    hot: dict[tuple[str, BalanceType], WalletState | None] = {}
    for account in accounts:  # read first: a wallet that rolls into a new period writes records
        for balance_type in BalanceType:
            key = (account.account_id, balance_type)
            hot[key] = await ctx.store.read_wallet(account.agency_id, account.account_id, balance_type, now)
    await Flusher(ctx).flush()
    totals = await ctx.db.wallet_totals()
    reserved = _reserved_by_account(await ctx.db.open_sessions())
    differences = []
    for account in accounts:
        plan = await ctx.catalog.client_plan(account)
        for balance_type in BalanceType:
            name = f"{account.account_id} {balance_type.name.lower()}"
            wallet = hot[(account.account_id, balance_type)]
            if wallet is None:
                differences.append(f"{name}: missing from the hot store")
                continue
            expected = await _wallet(ctx, account, balance_type, plan, totals, reserved)
            for field in ("free_micros", "purchased_micros", "reserved_micros", "used_micros"):
                want, have = getattr(expected, field), getattr(wallet, field)
                if want != have:
                    differences.append(f"{name} {field}: ledger {want}, hot store {have}")
    return differences


def _reserved_by_account(open_sessions: list[SessionRecord]) -> dict[str, int]:
    """What the open sessions hold on each account."""
    reserved: dict[str, int] = {}
    for record in open_sessions:
        for account_id, micros in record.reserved.items():
            reserved[account_id] = reserved.get(account_id, 0) + micros
    return reserved


async def _wallet(
    ctx: Context,
    account: Account,
    balance_type: BalanceType,
    plan: Plan | None,
    totals: dict[tuple[str, BalanceType], tuple[int, int]],
    reserved: dict[str, int],
) -> WalletState:
    config = account.wallet_config(balance_type, plan)
    mark = await ctx.db.period_mark(account.account_id, balance_type)
    start, end = period_bounds_epoch(max(mark or 0.0, account.created_at), config.anchor_day)
    free, purchased = totals.get((account.account_id, balance_type), (0, 0))
    db = ctx.db
    return WalletState(
        account_id=account.account_id,
        balance_type=balance_type,
        config=config,
        period_start=start,
        period_end=end,
        free_micros=free,
        purchased_micros=purchased,
        reserved_micros=reserved.get(account.account_id, 0) if balance_type is BalanceType.VOICE else 0,
        used_micros=await db.usage_since(account.account_id, balance_type, start),
        refills_this_period=await db.count_events_since(
            account.account_id, balance_type, EventType.REFILL_REQUESTED, start
        ),
        limit_notified=await db.count_events_since(account.account_id, balance_type, EventType.LIMIT_REACHED, start)
        > 0,
    )
