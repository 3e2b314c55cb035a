"""Offline commands against the shared stores: reconcile, rebuild."""

from __future__ import annotations

from creditd.app import make_store
from creditd.config import Settings
from creditd.db import Database
from creditd.engine.context import Context
from creditd.engine.durability import rebuild, reconcile


async def _context(settings: Settings) -> Context:
    if not settings.redis_url:
        raise SystemExit("reconcile and rebuild work on a shared Redis: set CREDITD_REDIS_URL")
    db = Database(settings.database_url)
    await db.ping()
    store, bus = await make_store(settings)
    ctx = Context(settings, store, db, bus)
    await ctx.catalog.load()
    return ctx


async def run_reconcile(settings: Settings) -> int:
    """Print every difference between Redis and the ledger; 0 when there is none."""
    ctx = await _context(settings)
    try:
        if await ctx.store.ping() is False:
            print("the hot store holds nothing: it was never loaded or lost its data (run creditd rebuild)")
            return 1
        differences = await reconcile(ctx)
        for line in differences:
            print(line)
        accounts = len(await ctx.db.list_accounts())
        print(f"{accounts} accounts checked, {len(differences)} differences")
        return 1 if differences else 0
    finally:
        await ctx.store.close()
        await ctx.db.close()


async def run_rebuild(settings: Settings) -> int:
    """Load Redis from the database, settling sessions that were open. Stop the replicas first."""
    ctx = await _context(settings)
    try:
        async with ctx.store.rebuild_lock() as mine:
            if not mine:
                print("another replica is rebuilding the hot store")
                return 1
            settled = await rebuild(ctx)
        print(f"hot store rebuilt from the database; {settled} open sessions settled")
        return 0
    finally:
        await ctx.store.close()
        await ctx.db.close()
