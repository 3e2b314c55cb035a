"""Write-behind, rebuild and reconcile: the hot store and the ledger agree to the micro-credit."""

from __future__ import annotations

from creditd.domain.records import BalanceType, EntryKind, LedgerRecord, new_id
from creditd.engine.durability import rebuild, reconcile
from tests.conftest import CREDIT, Running


async def _activity(server: Running) -> None:
    api = server.api
    await api.agency("a1")
    await api.plan("a1", "p", free_voice_micros=5 * CREDIT)
    await api.client("c1", "a1", "p")
    await api.topup("c1", 2 * CREDIT, "t1")
    await api.authorize("done", "c1")
    call, _ = await api.start_call("done", "c1")
    await api.end_call(call, 90)
    await api.authorize("live", "c1")
    await api.start_call("live", "c1")  # answered, and still holding its reservation
    await api.authorize("waiting", "c1")  # authorized, never answered


async def test_reconcile_finds_no_difference_after_activity_and_finds_a_tampered_wallet(server: Running) -> None:
    await _activity(server)
    ctx = server.app.ctx
    assert await reconcile(ctx) == []
    wallet = await ctx.store.read_wallet("a1", "c1", BalanceType.VOICE, ctx.now())
    assert wallet is not None
    unrecorded = LedgerRecord(new_id(), "c1", BalanceType.VOICE, EntryKind.TOPUP, 1, 0, 1, 0, ctx.now())
    await ctx.store.apply_topup("a1", unrecorded, ctx.now())  # a micro-credit the ledger never saw
    assert await reconcile(ctx, attempts=1) == [
        f"c1 voice purchased_micros: ledger {wallet.purchased_micros}, hot store {wallet.purchased_micros + 1}"
    ]


async def test_rebuild_restores_the_hot_store_exactly(server: Running) -> None:
    await _activity(server)
    ctx = server.app.ctx
    before = {(a, b): await ctx.store.read_wallet("a1", a, b, ctx.now()) for a in ("a1", "c1") for b in BalanceType}
    await server.app.flusher.flush()
    await server.app.metering.close()  # no run may settle the live session behind our back
    settled = await rebuild(ctx)
    assert settled == 2  # the live call, settled at its full grant; the waiting one released
    after = {(a, b): await ctx.store.read_wallet("a1", a, b, ctx.now()) for a in ("a1", "c1") for b in BalanceType}
    for key, wallet in before.items():
        assert wallet is not None and after[key] is not None
        rebuilt = after[key]
        assert rebuilt is not None
        assert rebuilt.reserved_micros == 0
        # the live call's 60 s grant was billed: one credit on each payer's voice wallet; the
        # call that was never answered, nothing
        billed = CREDIT if key[1] is BalanceType.VOICE else 0
        assert rebuilt.free_micros + rebuilt.purchased_micros == wallet.free_micros + wallet.purchased_micros - billed
    assert await reconcile(ctx) == []
