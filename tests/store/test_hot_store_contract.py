"""The HotStore contract, run against the embedded store and the Redis store alike.

The Redis store runs against the development machine's Redis (CREDITD_TEST_REDIS_URL, see
tests/services.py) under a key prefix unique to the test, whose keys are deleted at teardown.
A property test drives both stores through the same random operations and requires the
same results, states and outbox records.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import random
import shutil
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from creditd.domain.periods import period_bounds_epoch
from creditd.domain.records import (
    BalanceType,
    EntryKind,
    EventRecord,
    EventType,
    LedgerRecord,
    Record,
    SessionRecord,
    TopupKind,
    new_id,
)
from creditd.domain.tariff import SliceTerms, Tariff
from creditd.domain.wallet import Constraint, RefillSettings, WalletConfig, WalletState
from creditd.errors import CreditdError, FailedPrecondition, NotFound, StoreUnavailable
from creditd.store.base import (
    HotStore,
    Payer,
    ReserveRequest,
    ReserveResult,
    SessionOpen,
    SessionState,
    SettleRequest,
    SettleResult,
    SmsDebitRequest,
    SmsDebitResult,
)
from creditd.store.embedded import EmbeddedHotStore
from creditd.store.redis import RedisHotStore, decode_record, encode_record
from tests.redis_cluster import LocalRedisCluster
from tests.services import REDIS_URL

RUN = uuid.uuid4().hex[:10]
_stores = itertools.count(1)

VOICE, SMS = BalanceType.VOICE, BalanceType.SMS
C = 1_000_000  # one credit
T0 = 1_705_312_800.0  # 2024-01-15 10:00 UTC
JAN = period_bounds_epoch(T0, 1)
FEB = period_bounds_epoch(T0 + 20 * 86400, 1)
AGENCY = "ag"


# -- stores ----------------------------------------------------------------------------------


async def _delete_keys(pattern: str, url: str = REDIS_URL, cluster: bool = False) -> None:
    client = aioredis.RedisCluster.from_url(url) if cluster else aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i : i + 500])  # a cluster client splits it by slot
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def open_store(kind: str, url: str = REDIS_URL) -> AsyncIterator[HotStore]:
    """`kind`: embedded, redis (the machine's Redis), or redis-cluster (at `url`)."""
    if kind == "embedded":
        yield EmbeddedHotStore(retention_seconds=math.inf)  # Redis here keeps them too
        return
    prefix = f"creditd-test-{RUN}-{next(_stores)}:"
    cluster = kind == "redis-cluster"
    store = RedisHotStore(url, prefix, cluster=cluster)
    try:
        yield store
    finally:
        await store.close()
        await _delete_keys(prefix + "*", url, cluster)


@pytest.fixture(params=["embedded", "redis", "redis-cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[HotStore]:
    url = request.getfixturevalue("redis_cluster").url if request.param == "redis-cluster" else REDIS_URL
    async with open_store(request.param, url) as opened:
        yield opened


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisHotStore]:
    async with open_store("redis") as opened:
        assert isinstance(opened, RedisHotStore)
        yield opened


# -- helpers ---------------------------------------------------------------------------------


def topup_entry(
    account: str, balance_type: BalanceType, free: int = 0, purchased: int = 0, entry_id: str = ""
) -> LedgerRecord:
    return LedgerRecord(
        entry_id=entry_id or new_id(),
        account_id=account,
        balance_type=balance_type,
        kind=EntryKind.TOPUP,
        amount_micros=free + purchased,
        free_micros=free,
        purchased_micros=purchased,
        usage_micros=0,
        created_at=T0,
        topup_kind=TopupKind.PURCHASE,
    )


async def wallet(
    store: HotStore,
    account: str,
    balance_type: BalanceType = VOICE,
    *,
    free: int = 0,
    purchased: int = 0,
    now: float = T0,
    **config: Any,
) -> None:
    """Create a wallet and credit it."""
    await store.configure_wallet(AGENCY, account, balance_type, WalletConfig(**config), now, new_agency=True)
    if free or purchased:
        await store.apply_topup(AGENCY, topup_entry(account, balance_type, free, purchased), now)


async def read(store: HotStore, account: str, balance_type: BalanceType = VOICE, now: float = T0) -> WalletState:
    state = await store.read_wallet(AGENCY, account, balance_type, now)
    assert state is not None
    return state


def terms(rate: int, granted: int = 0) -> SliceTerms:
    tariff = Tariff()
    tariff.price_from(0, rate)
    return tariff.terms(granted)


def opening(client: str = "c1", cap: int = 0) -> SessionOpen:
    return SessionOpen(
        client_id=client, channel=1, direction=1, provider="deepgram", max_concurrent=cap, authorized_until=T0 + 60
    )


async def reserve(
    store: HotStore,
    session_id: str,
    want: int,
    payers: dict[str, SliceTerms],
    *,
    open_as: SessionOpen | None = None,
    now: float = T0,
    lease_until: float = T0 + 90,
    epoch: int = 1,
) -> ReserveResult:
    return await store.reserve(
        ReserveRequest(
            session_id=session_id,
            agency_id=AGENCY,
            balance_type=VOICE,
            want_seconds=want,
            payers=tuple(Payer(account, t) for account, t in payers.items()),
            now=now,
            lease_until=lease_until,
            open=open_as,
            epoch=epoch,
        )
    )


async def drain(store: HotStore) -> list[Record]:
    batch = await store.take_records(10_000)
    await store.ack_records([outbox_id for outbox_id, _ in batch])
    return [record for _, record in batch]


def anonymous(record: Record) -> Record:
    """The record without the parts that differ between stores by design (ids)."""
    if isinstance(record, LedgerRecord):
        return dataclasses.replace(record, entry_id="")
    if isinstance(record, EventRecord):
        return dataclasses.replace(record, event_id="")
    return record


def events(records: list[Record], type_: EventType | None = None) -> list[EventRecord]:
    return [r for r in records if isinstance(r, EventRecord) and (type_ is None or r.type is type_)]


def entries(records: list[Record]) -> list[LedgerRecord]:
    return [r for r in records if isinstance(r, LedgerRecord)]


# -- configuration and reads -----------------------------------------------------------------


async def test_configure_and_read(store: HotStore) -> None:
    config = WalletConfig(free_allowance_micros=3 * C, refill=RefillSettings(True, C, 5 * C, 0, 2))
    assert await store.configure_wallet(AGENCY, "ag", VOICE, config, T0, new_agency=True) == []
    state = await read(store, "ag")
    assert state == WalletState("ag", VOICE, config, period_start=JAN[0], period_end=JAN[1])
    assert await store.read_wallet(AGENCY, "ag", SMS, T0) is None

    changed = WalletConfig(has_wallet=True, usage_limit_micros=9 * C, low_balance_threshold_micros=C)
    assert await store.configure_wallet(AGENCY, "ag", VOICE, changed, T0 + 60) == []
    assert (await read(store, "ag")).config == changed

    await store.configure_wallet(AGENCY, "c9", SMS, WalletConfig(anchor_day=15), T0)
    state = await read(store, "c9", SMS)
    assert (state.period_start, state.period_end) == period_bounds_epoch(T0, 15)
    assert await drain(store) == []


async def test_unknown_wallets_and_sessions(store: HotStore) -> None:
    await wallet(store, "ag")  # the agency's state is there; these are not
    with pytest.raises(NotFound):
        await store.apply_topup(AGENCY, topup_entry("nobody", VOICE, 0, C), T0)
    with pytest.raises(NotFound):
        await reserve(store, "s1", 60, {"nobody": terms(C)}, open_as=opening())
    with pytest.raises(FailedPrecondition) as not_open:
        await reserve(store, "s1", 60, {"nobody": terms(C)})
    assert not_open.value.reason == "SESSION_NOT_OPEN"
    with pytest.raises(NotFound) as no_session:
        await store.settle(SettleRequest("s1", AGENCY, 0, {}, T0))
    assert no_session.value.reason == "SESSION_NOT_FOUND"
    assert await store.session(AGENCY, "s1") is None


async def test_an_agency_whose_state_the_redis_store_lost_is_unavailable_never_missing() -> None:
    async with open_store("redis") as store:
        assert isinstance(store, RedisHotStore)
        await wallet(store, "ag", purchased=C)
        await wallet(store, "c1", purchased=C)
        opened = await reserve(store, "s1", 60, {"c1": terms(C), "ag": terms(C)}, open_as=opening())
        assert opened.granted_seconds == 60
        await _delete_keys(store._prefix + "*", REDIS_URL, cluster=False)  # the store lost everything it held
        told: list[str] = []
        store.loss_listeners.append(told.append)  # the health monitor's wake-up
        calls = [
            store.read_wallet(AGENCY, "c1", VOICE, T0),
            store.apply_topup(AGENCY, topup_entry("c1", VOICE, 0, C), T0),
            reserve(store, "s2", 60, {"c1": terms(C), "ag": terms(C)}, open_as=opening()),
            reserve(store, "s1", 60, {"c1": terms(C, 60), "ag": terms(C, 60)}),
            store.settle(SettleRequest("s1", AGENCY, 10, {"c1": 1, "ag": 1}, T0)),
            store.claim(AGENCY, "s1", "c1", T0, T0 + 90),
            store.debit_sms(sms("m1", {"c1": 1, "ag": 1})),
            store.configure_wallet(AGENCY, "c2", VOICE, WalletConfig(), T0),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable) as raised:
                await call
            assert raised.value.metadata == {"state": "rebuilding", "agency_id": AGENCY}
        assert store.lost == {AGENCY}
        assert told == [AGENCY]  # once, when the loss was first found
        await store.load([], [], ())  # a rebuild that knows no wallet of it still marks nothing
        assert await store.agencies_present([AGENCY]) == set()
        await store.load([(AGENCY, WalletState("c1", VOICE, WalletConfig(), 0, 0))], [], ())
        assert await store.agencies_present([AGENCY]) == {AGENCY} and store.lost == set()
        # the agency is whole again: what it does not hold is missing, not unavailable
        assert await store.read_wallet(AGENCY, "nobody", VOICE, T0) is None


# -- reserve ---------------------------------------------------------------------------------


async def test_reserve_one_payer_exact_micros_and_partial_slice(store: HotStore) -> None:
    await wallet(store, "ag", purchased=1_500_000)
    first = await reserve(store, "s1", 60, {"ag": terms(C)}, open_as=opening())
    assert first == ReserveResult(60, 60, 90, None, reserved={"ag": C})

    # 500,000 left: 30 more seconds, and the wallet is what limits the slice
    second = await reserve(store, "s1", 60, {"ag": terms(C, 60)})
    assert second == ReserveResult(30, 90, 30, ("ag", Constraint.WALLET), reserved={"ag": 1_500_000})
    assert (await read(store, "ag")).reserved_micros == 1_500_000

    third = await reserve(store, "s1", 60, {"ag": terms(C, 90)})
    assert third == ReserveResult(0, 90, 0, ("ag", Constraint.WALLET), reserved={"ag": 1_500_000})


async def test_reserve_rounds_up_on_cumulative_seconds(store: HotStore) -> None:
    await wallet(store, "c1", purchased=100_000)
    rate = 166_667  # ceil(166,667 * 7 / 60) = 19,445; ceil(166,667 * 14 / 60) = 38,889
    first = await reserve(store, "s1", 7, {"c1": terms(rate)}, open_as=opening())
    assert (first.granted_seconds, first.headroom_seconds, first.reserved) == (7, 35, {"c1": 19_445})
    second = await reserve(store, "s1", 7, {"c1": terms(rate, 7)})
    assert second.reserved == {"c1": 38_889}  # the cost of 14 seconds: slicing changes nothing


async def test_reserve_two_payers_limited_by_client_wallet(store: HotStore) -> None:
    await wallet(store, "c1", purchased=500_000)
    await wallet(store, "ag", purchased=10 * C)
    result = await reserve(store, "s1", 60, {"c1": terms(2 * C), "ag": terms(C)}, open_as=opening())
    assert result == ReserveResult(15, 15, 15, ("c1", Constraint.WALLET), reserved={"c1": 500_000, "ag": 250_000})
    assert (await read(store, "c1")).reserved_micros == 500_000
    assert (await read(store, "ag")).reserved_micros == 250_000


async def test_reserve_two_payers_limited_by_agency_wallet(store: HotStore) -> None:
    await wallet(store, "c1", purchased=10 * C)
    await wallet(store, "ag", free=200_000)
    result = await reserve(store, "s1", 60, {"c1": terms(2 * C), "ag": terms(C)}, open_as=opening())
    assert result == ReserveResult(12, 12, 12, ("ag", Constraint.WALLET), reserved={"c1": 400_000, "ag": 200_000})


async def test_reserve_limited_by_usage_limit_notifies_once(store: HotStore) -> None:
    await wallet(store, "c2", has_wallet=False, usage_limit_micros=C)
    await wallet(store, "ag", purchased=100 * C)
    result = await reserve(store, "s1", 60, {"c2": terms(2 * C), "ag": terms(C)}, open_as=opening("c2"))
    assert result == ReserveResult(30, 30, 30, ("c2", Constraint.LIMIT), reserved={"c2": C, "ag": 500_000})
    state = await read(store, "c2")
    assert (state.reserved_micros, state.limit_notified, state.available()) == (C, True, 0)
    again = await reserve(store, "s2", 60, {"c2": terms(2 * C), "ag": terms(C)}, open_as=opening("c2"))
    assert again == ReserveResult(0, 0, 0, ("c2", Constraint.LIMIT))
    assert await store.session(AGENCY, "s2") is None  # nothing reserved, nothing opened

    limit_events = events(await drain(store), EventType.LIMIT_REACHED)
    assert [(e.account_id, e.amount_micros, e.balance_type) for e in limit_events] == [("c2", C, VOICE)]


async def test_reserve_tie_between_wallet_and_limit_names_the_limit(store: HotStore) -> None:
    await wallet(store, "c1", purchased=C, usage_limit_micros=C)
    result = await reserve(store, "s1", 120, {"c1": terms(C)}, open_as=opening())
    assert result.limited_by == ("c1", Constraint.LIMIT)
    assert result.granted_seconds == 60


async def test_reserve_unbounded_payers(store: HotStore) -> None:
    await wallet(store, "c2", has_wallet=False)  # no wallet and no limit: no bound
    await wallet(store, "ag", purchased=C)
    result = await reserve(store, "s1", 60, {"c2": terms(0), "ag": terms(0)}, open_as=opening("c2"))
    assert result == ReserveResult(60, 60, None, None, reserved={"c2": 0, "ag": 0})


async def test_concurrency_cap(store: HotStore) -> None:
    await wallet(store, "ag", purchased=100 * C)
    payers = {"ag": terms(C)}
    assert (await reserve(store, "s1", 60, payers, open_as=opening(cap=1))).granted_seconds == 60
    denied = await reserve(store, "s2", 60, payers, open_as=opening(cap=1))
    assert denied == ReserveResult(0, 0, None, concurrency_denied=True)
    assert (await reserve(store, "s3", 60, payers, open_as=opening("c7", cap=1))).granted_seconds == 60
    # the same session_id again: the session as it is, nothing more reserved
    repeat = await reserve(store, "s1", 60, payers, open_as=opening(cap=1))
    assert repeat == ReserveResult(0, 60, None, reserved={"ag": C})

    await store.settle(SettleRequest("s1", AGENCY, 10, {"ag": 166_667}, T0 + 10))
    assert (await reserve(store, "s2", 60, payers, open_as=opening(cap=1))).granted_seconds == 60
    live = await store.live_sessions(AGENCY)
    assert sorted(s.session_id for s in live) == ["s2", "s3"]


async def test_the_lease_follows_the_last_reservation(store: HotStore) -> None:
    await wallet(store, "ag", purchased=C)
    await reserve(store, "s1", 30, {"ag": terms(C)}, open_as=opening(), lease_until=T0 + 75)
    state = await store.session(AGENCY, "s1")
    assert state is not None and state.expires_at == T0 + 75
    await reserve(store, "s1", 30, {"ag": terms(C, 30)}, lease_until=T0 + 105.5)
    state = await store.session(AGENCY, "s1")
    assert state is not None and (state.expires_at, state.granted_seconds) == (T0 + 105.5, 60)
    nothing = await reserve(store, "s1", 30, {"ag": terms(C, 60)}, lease_until=T0 + 200)
    assert nothing.granted_seconds == 0
    state = await store.session(AGENCY, "s1")
    assert state is not None and state.expires_at == T0 + 105.5  # renewed only by a grant


async def test_exact_arithmetic_at_the_ceilings(store: HotStore) -> None:
    """Amounts near 10**14 and rates near 10**10 (products beyond 2**53): Python's integers."""
    funds = {"c1": 99_999_999_999_989, "ag": 99_999_999_987_644}
    base_rates = {"c1": 9_999_999_967, "ag": 9_999_999_999}
    for account, micros in funds.items():
        await wallet(store, account, purchased=micros)
    tariffs = {account: Tariff() for account in funds}
    granted = 0
    for step, want in enumerate((7, 599_980, 60, 5, 1, 1000)):
        for account, tariff in tariffs.items():
            tariff.price_from(granted, base_rates[account] - 3 * step)
        payers = {account: t.terms(granted) for account, t in tariffs.items()}
        affordable = {a: payers[a].affordable(funds[a] - tariffs[a].cost(granted)) for a in funds}
        headroom = min(s for s in affordable.values() if s is not None)
        result = await reserve(store, "s1", want, payers, open_as=opening() if step == 0 else None)
        assert (result.headroom_seconds, result.granted_seconds) == (headroom, min(want, headroom))
        granted = result.total_granted_seconds
        assert result.reserved == {account: tariff.cost(granted) for account, tariff in tariffs.items()}
    assert granted > 599_980
    for account, tariff in tariffs.items():
        state = await read(store, account)
        assert state.reserved_micros == tariff.cost(granted) <= funds[account]


async def test_the_first_claim_records_when_the_call_was_answered(store: HotStore) -> None:
    await wallet(store, "ag", purchased=2 * C)
    await reserve(store, "s1", 60, {"ag": terms(C)}, open_as=opening())
    opened = [r for r in await drain(store) if isinstance(r, SessionRecord)]
    assert [r.started_at for r in opened] == [0.0]  # authorized, not answered
    claimed = await store.claim(AGENCY, "s1", "c1", T0 + 5, T0 + 95)
    assert claimed is not None and claimed.started_at == T0 + 5
    answered = [r for r in await drain(store) if isinstance(r, SessionRecord)]
    assert [(r.session_id, r.status, r.granted_seconds, r.started_at) for r in answered] == [("s1", "open", 60, T0 + 5)]
    await store.claim(AGENCY, "s1", "c1", T0 + 7, T0 + 97)  # taken over: answered once, nothing new
    assert [r for r in await drain(store) if isinstance(r, SessionRecord)] == []
    await reserve(store, "s1", 60, {"ag": terms(C, 60)}, epoch=3)  # every later state says it too
    assert [r.started_at for r in await drain(store) if isinstance(r, SessionRecord)] == [T0 + 5]


# -- settle ----------------------------------------------------------------------------------


async def test_settle_free_before_purchased_then_idempotent(store: HotStore) -> None:
    await wallet(store, "c1", free=300_000, purchased=2 * C)
    await wallet(store, "ag", free=10 * C)
    await reserve(store, "s1", 60, {"c1": terms(C), "ag": terms(C)}, open_as=opening())
    await drain(store)

    request = SettleRequest("s1", AGENCY, 30, {"c1": 500_000, "ag": 500_000}, T0 + 30)
    result = await store.settle(request)
    assert (result.billed_seconds, result.charged, result.already_settled) == (
        30,
        {"c1": 500_000, "ag": 500_000},
        False,
    )
    c1 = await read(store, "c1")
    assert (c1.free_micros, c1.purchased_micros, c1.reserved_micros, c1.used_micros) == (0, 1_800_000, 0, 500_000)
    ag = await read(store, "ag")
    assert (ag.free_micros, ag.purchased_micros, ag.reserved_micros, ag.used_micros) == (9_500_000, 0, 0, 500_000)

    records = [anonymous(r) for r in await drain(store)]
    # each entry names what it paid for: the session's client and provider
    usage = dict(session_id="s1", seconds=30, created_at=T0 + 30, client_id="c1", provider="deepgram")
    assert records == [
        LedgerRecord("", "c1", VOICE, EntryKind.VOICE_USAGE, -500_000, -300_000, -200_000, 500_000, **usage),  # type: ignore[arg-type]
        LedgerRecord("", "ag", VOICE, EntryKind.VOICE_USAGE, -500_000, -500_000, 0, 500_000, **usage),  # type: ignore[arg-type]
        SessionRecord(
            "s1", "c1", AGENCY, 1, 1, "deepgram", "settled", 60, 30,
            reserved={"c1": C, "ag": C}, charged={"c1": 500_000, "ag": 500_000}, updated_at=T0 + 30,
        ),
    ]  # fmt: skip

    again = await store.settle(dataclasses.replace(request, billed_seconds=60, costs={"c1": C, "ag": C}))
    assert (again.billed_seconds, again.charged, again.already_settled) == (30, {"c1": 500_000, "ag": 500_000}, True)
    assert (await read(store, "c1")).purchased_micros == 1_800_000
    assert await drain(store) == []
    state = await store.session(AGENCY, "s1")
    assert state is not None and (state.status, state.billed_seconds, state.charged) == (
        "settled",
        30,
        {"c1": 500_000, "ag": 500_000},
    )
    assert await store.live_sessions(AGENCY) == []
    with pytest.raises(FailedPrecondition):
        await reserve(store, "s1", 60, {"c1": terms(C, 60), "ag": terms(C, 60)})


async def test_settle_caps_costs_at_the_reservation_and_releases_the_rest(store: HotStore) -> None:
    await wallet(store, "c1", purchased=5 * C)
    await wallet(store, "ag", purchased=5 * C)
    await reserve(store, "s1", 60, {"c1": terms(C), "ag": terms(C)}, open_as=opening())
    # a cost beyond the reservation is capped; a payer missing from costs pays nothing
    result = await store.settle(SettleRequest("s1", AGENCY, 60, {"c1": 9 * C}, T0 + 60, cutoff_reason=2))
    assert result.charged == {"c1": C, "ag": 0}
    assert result.cutoff_reason == 2
    assert (await read(store, "c1")).purchased_micros == 4 * C
    ag = await read(store, "ag")
    assert (ag.purchased_micros, ag.reserved_micros) == (5 * C, 0)
    cutoff = events(await drain(store), EventType.CUTOFF)
    assert [(e.account_id, e.reason, e.session_id, e.attributes) for e in cutoff] == [
        ("c1", 2, "s1", {"billed_seconds": "60"})
    ]


async def test_settle_with_costs_naming_no_payer(store: HotStore) -> None:
    """The Redis store learns the session's payers and client from the session itself."""
    await wallet(store, "c1", purchased=5 * C)
    await wallet(store, "ag", purchased=5 * C)
    await reserve(store, "s1", 60, {"c1": terms(C), "ag": terms(C)}, open_as=opening(cap=1))
    result = await store.settle(SettleRequest("s1", AGENCY, 0, {}, T0))
    assert result.charged == {"c1": 0, "ag": 0}
    assert (await read(store, "c1")).reserved_micros == 0
    # the client's open session was released: the cap lets a new one in
    assert (await reserve(store, "s2", 60, {"c1": terms(C)}, open_as=opening(cap=1))).granted_seconds == 60


# -- SMS -------------------------------------------------------------------------------------


def sms(
    message_id: str,
    costs: dict[str, int],
    segments: int = 1,
    now: float = T0,
    client: str = "c1",
    country: str = "GB",
) -> SmsDebitRequest:
    return SmsDebitRequest(message_id, "sms-1", AGENCY, client, segments, costs, now, country)


async def test_debit_sms_all_or_nothing_and_idempotent(store: HotStore) -> None:
    await wallet(store, "c1", SMS, purchased=C)
    await wallet(store, "ag", SMS, free=200_000)
    costs = {"c1": 332_000, "ag": 166_000}

    first = await store.debit_sms(sms("m1", costs, segments=2))
    assert (first.allowed, first.charged, first.duplicate) == (True, costs, False)
    records = [anonymous(r) for r in await drain(store)]
    usage = dict(session_id="sms-1", message_id="m1", seconds=2, created_at=T0, client_id="c1")
    usage["destination_country"] = "GB"
    assert records == [
        LedgerRecord("", "c1", SMS, EntryKind.SMS_USAGE, -332_000, 0, -332_000, 332_000, **usage),  # type: ignore[arg-type]
        LedgerRecord("", "ag", SMS, EntryKind.SMS_USAGE, -166_000, -166_000, 0, 166_000, **usage),  # type: ignore[arg-type]
    ]

    denied = await store.debit_sms(sms("m2", costs, segments=2))
    assert (denied.allowed, denied.charged, denied.limited_by) == (False, {}, ("ag", Constraint.WALLET))
    assert (await read(store, "c1", SMS)).purchased_micros == C - 332_000  # the client paid nothing either
    assert await drain(store) == []

    duplicate = await store.debit_sms(sms("m1", costs, segments=2))
    assert (duplicate.allowed, duplicate.charged, duplicate.duplicate) == (True, costs, True)
    assert (await read(store, "c1", SMS)).used_micros == 332_000

    # a denial is not remembered: the same message goes through once the agency pays
    await store.apply_topup(AGENCY, topup_entry("ag", SMS, purchased=C), T0)
    retried = await store.debit_sms(sms("m2", costs, segments=2))
    assert (retried.allowed, retried.duplicate) == (True, False)


async def test_debit_sms_message_ids_are_per_client_and_keep_their_parameters(store: HotStore) -> None:
    for account in ("c1", "c2", "ag"):
        await wallet(store, account, SMS, purchased=C)
    assert not (await store.debit_sms(sms("m1", {"c1": 166_000, "ag": 166_000}, country="US"))).duplicate
    # Another client with the same id: its own message, debited.
    other = await store.debit_sms(sms("m1", {"c2": 332_000, "ag": 332_000}, segments=2, client="c2", country="GB"))
    assert (other.allowed, other.charged, other.duplicate) == (True, {"c2": 332_000, "ag": 332_000}, False)
    assert (await read(store, "c2", SMS)).used_micros == 332_000
    await drain(store)
    # The same client with other parameters: refused, nothing changes.
    for segments, country in ((2, "US"), (1, "GB")):
        with pytest.raises(FailedPrecondition) as raised:
            await store.debit_sms(sms("m1", {"c1": 166_000 * segments, "ag": 1}, segments=segments, country=country))
        assert (raised.value.reason, raised.value.metadata) == ("MESSAGE_ID_REUSED", {"message_id": "m1"})
    assert (await read(store, "c1", SMS)).used_micros == 166_000
    assert (await read(store, "ag", SMS)).used_micros == 166_000 + 332_000
    assert await drain(store) == []
    # ... and the same parameters replay the first result.
    replay = await store.debit_sms(sms("m1", {"c1": 999, "ag": 999}, country="US"))
    assert (replay.allowed, replay.charged, replay.duplicate) == (True, {"c1": 166_000, "ag": 166_000}, True)


async def test_debit_sms_usage_limit(store: HotStore) -> None:
    await wallet(store, "c2", SMS, has_wallet=False, usage_limit_micros=300_000)
    await wallet(store, "ag", SMS, purchased=C)
    costs = {"c2": 166_000, "ag": 166_000}
    assert (await store.debit_sms(sms("m1", costs))).allowed
    denied = await store.debit_sms(sms("m2", costs))
    assert denied.limited_by == ("c2", Constraint.LIMIT)
    assert not (await store.debit_sms(sms("m3", costs))).allowed
    records = await drain(store)
    assert [e.account_id for e in events(records, EventType.LIMIT_REACHED)] == ["c2"]
    c2_usage = [e for e in entries(records) if e.account_id == "c2"]
    assert [(e.amount_micros, e.usage_micros) for e in c2_usage] == [(0, 166_000)]


# -- top-ups, periods, alerts ----------------------------------------------------------------


async def test_apply_topup_is_idempotent(store: HotStore) -> None:
    await wallet(store, "ag")
    entry = topup_entry("ag", VOICE, free=C, purchased=2 * C)
    first = await store.apply_topup(AGENCY, entry, T0)
    second = await store.apply_topup(AGENCY, entry, T0 + 1)
    assert (first.free_micros, first.purchased_micros) == (C, 2 * C)
    assert second == first
    assert await drain(store) == []


async def test_topup_clears_the_limit_notice_once_the_limit_has_room(store: HotStore) -> None:
    await wallet(store, "c1", SMS, purchased=C, usage_limit_micros=C)
    assert (await store.debit_sms(sms("m1", {"c1": C}))).allowed
    assert not (await store.debit_sms(sms("m2", {"c1": 1}))).allowed
    assert (await read(store, "c1", SMS)).limit_notified
    await store.configure_wallet(AGENCY, "c1", SMS, WalletConfig(usage_limit_micros=2 * C), T0, new_agency=True)
    assert not (await read(store, "c1", SMS)).limit_notified


async def test_period_roll_carries_free_credits_backing_live_reservations(store: HotStore) -> None:
    await wallet(store, "ag", free=5 * C, purchased=C, free_allowance_micros=3 * C)
    await reserve(store, "s1", 360, {"ag": terms(C)}, open_as=opening())
    await drain(store)

    later = T0 + 20 * 86400  # 2024-02-04: the January period has ended
    state = await read(store, "ag", now=later)
    # needed = 6 reserved - 1 purchased - 3 allowance = 2 carried; 3 expire
    assert (state.period_start, state.period_end) == FEB
    assert (state.free_micros, state.purchased_micros, state.reserved_micros, state.used_micros) == (5 * C, C, 6 * C, 0)
    records = [anonymous(r) for r in await drain(store)]
    assert records == [
        LedgerRecord("", "ag", VOICE, EntryKind.FREE_EXPIRY, -3 * C, -3 * C, 0, 0, later),
        EventRecord("", "ag", EventType.FREE_CREDITS_EXPIRED, VOICE, later, amount_micros=3 * C),
        LedgerRecord("", "ag", VOICE, EntryKind.FREE_ALLOWANCE, 3 * C, 3 * C, 0, 0, later),
    ]
    assert await store.read_wallet(AGENCY, "ag", VOICE, later + 1) == state  # once per period
    result = await store.settle(SettleRequest("s1", AGENCY, 360, {"ag": 6 * C}, later))
    assert result.charged == {"ag": 6 * C}
    state = await read(store, "ag", now=later)
    assert (state.free_micros, state.purchased_micros, state.reserved_micros) == (0, 0, 0)


async def test_period_roll_inside_an_operation(store: HotStore) -> None:
    await wallet(store, "c1", SMS, free=C, free_allowance_micros=C, usage_limit_micros=5 * C, anchor_day=15)
    assert (await store.debit_sms(sms("m1", {"c1": 400_000}))).allowed
    later = T0 + 31 * 86400  # past 2024-02-15, the end of the period anchored on the 15th
    assert (await store.debit_sms(sms("m2", {"c1": 100_000}, now=later))).allowed
    state = await read(store, "c1", SMS, now=later)
    assert (state.period_start, state.period_end) == period_bounds_epoch(later, 15)
    assert (state.free_micros, state.used_micros) == (900_000, 100_000)
    kinds = [e.kind for e in entries(await drain(store))]
    assert kinds == [EntryKind.SMS_USAGE, EntryKind.FREE_EXPIRY, EntryKind.FREE_ALLOWANCE, EntryKind.SMS_USAGE]


async def test_alerts_fire_once_per_crossing_with_deterministic_keys(store: HotStore) -> None:
    refill = RefillSettings(enabled=True, threshold_micros=4 * C, amount_micros=20 * C, max_per_period=2)
    await wallet(store, "ag", SMS, purchased=10 * C, refill=refill, low_balance_threshold_micros=5 * C)
    for n in range(8):  # 10 -> 2 credits, one credit at a time
        assert (await store.debit_sms(sms(f"a{n}", {"ag": C}))).allowed
    first = events(await drain(store))
    assert [(e.type, e.amount_micros, e.idempotency_key) for e in first] == [
        (EventType.LOW_BALANCE, 4 * C, ""),
        (EventType.REFILL_REQUESTED, 20 * C, f"refill:ag:sms:{JAN[0]}:1"),
    ]
    await store.apply_topup(AGENCY, topup_entry("ag", SMS, purchased=10 * C), T0)
    for n in range(9):  # 12 -> 3 credits
        assert (await store.debit_sms(sms(f"b{n}", {"ag": C}))).allowed
    second = events(await drain(store))
    assert [(e.type, e.idempotency_key) for e in second] == [
        (EventType.LOW_BALANCE, ""),
        (EventType.REFILL_REQUESTED, f"refill:ag:sms:{JAN[0]}:2"),
    ]
    await store.apply_topup(AGENCY, topup_entry("ag", SMS, purchased=10 * C), T0)
    for n in range(9):
        assert (await store.debit_sms(sms(f"c{n}", {"ag": C}))).allowed
    third = events(await drain(store))
    assert [e.type for e in third] == [EventType.LOW_BALANCE]  # two refills per period at most
    assert (await read(store, "ag", SMS)).refills_this_period == 2


async def test_refill_to_a_target_balance(store: HotStore) -> None:
    refill = RefillSettings(enabled=True, threshold_micros=2 * C, target_balance_micros=15 * C, max_per_period=1)
    await wallet(store, "ag", purchased=3 * C, refill=refill)
    await reserve(store, "s1", 90, {"ag": terms(C)}, open_as=opening())  # 3 -> 1.5 available
    refills = events(await drain(store), EventType.REFILL_REQUESTED)
    assert [(e.amount_micros, e.idempotency_key) for e in refills] == [(13_500_000, f"refill:ag:voice:{JAN[0]}:1")]


# -- outbox and rebuild ----------------------------------------------------------------------


async def test_outbox_take_and_ack(store: HotStore) -> None:
    await wallet(store, "ag", free=2 * C, low_balance_threshold_micros=C)
    await reserve(store, "s1", 90, {"ag": terms(C)}, open_as=opening())  # LOW_BALANCE, session
    appended = EventRecord(new_id(), "c1", EventType.CUTOFF, SMS, T0, session_id="x", reason=1)
    await store.append_records(AGENCY, [appended])

    head = await store.take_records(2)
    assert [type(r) for _, r in head] == [EventRecord, SessionRecord]
    assert await store.take_records(2) == head  # not acknowledged: still there
    await store.ack_records([outbox_id for outbox_id, _ in head])
    rest = await store.take_records(10)
    assert [r for _, r in rest] == [appended]
    assert len({outbox_id for outbox_id, _ in head + rest}) == 3
    await store.ack_records([outbox_id for outbox_id, _ in rest])
    assert await store.take_records(10) == []
    await store.ack_records([outbox_id for outbox_id, _ in rest])  # again: nothing happens


async def test_load_replaces_the_state(store: HotStore) -> None:
    await wallet(store, "c1", purchased=5 * C)
    await wallet(store, "ag", purchased=5 * C)
    await wallet(store, "ag", SMS, purchased=5 * C)
    entry = topup_entry("ag", SMS, purchased=C)
    await store.apply_topup(AGENCY, entry, T0)
    included = topup_entry("ag", SMS, purchased=C)  # the database's wallet includes it
    await store.apply_topup(AGENCY, included, T0)
    await store.debit_sms(sms("m1", {"ag": 100_000}))
    await reserve(store, "old", 60, {"c1": terms(C), "ag": terms(C)}, open_as=opening())
    await drain(store)

    config = WalletConfig(free_allowance_micros=C)
    loaded = [
        (AGENCY, WalletState("c1", VOICE, WalletConfig(), *JAN, purchased_micros=7 * C, reserved_micros=2 * C)),
        (AGENCY, WalletState("ag", VOICE, config, *JAN, free_micros=C, purchased_micros=3 * C, reserved_micros=C)),
        (AGENCY, WalletState("ag", SMS, config, *JAN, purchased_micros=C, refills_this_period=1, limit_notified=True)),
    ]
    live = SessionState("live", AGENCY, "c1", 1, 2, "cartesia", "open", 120, {"c1": 2 * C, "ag": C}, T0 + 5)
    await store.load(loaded, [live], [(AGENCY, included.entry_id), ("", "orphan")])

    for _, state in loaded:
        assert await store.read_wallet(AGENCY, state.account_id, state.balance_type, T0) == state
    assert await store.session(AGENCY, "old") is None
    assert await store.session(AGENCY, "live") == live
    assert await store.live_sessions(AGENCY) == [live]
    # SMS results and top-ups were forgotten with the rest, except those the load names
    assert (await store.apply_topup(AGENCY, included, T0)).purchased_micros == C
    assert (await store.apply_topup(AGENCY, entry, T0)).purchased_micros == 2 * C
    assert not (await store.debit_sms(sms("m1", {"ag": 100_000}))).duplicate
    denied = await reserve(store, "s2", 60, {"c1": terms(C), "ag": terms(C)}, open_as=opening(cap=1))
    assert denied.concurrency_denied  # the loaded live session counts
    result = await store.settle(SettleRequest("live", AGENCY, 120, {"c1": 2 * C, "ag": C}, T0, cutoff_reason=6))
    assert result.charged == {"c1": 2 * C, "ag": C}
    c1 = await read(store, "c1")
    assert (c1.purchased_micros, c1.reserved_micros) == (5 * C, 0)


# -- Redis only ------------------------------------------------------------------------------


async def test_redis_key_layout(redis_store: RedisHotStore) -> None:
    store = redis_store
    await wallet(store, "c1", purchased=5 * C)
    await wallet(store, "ag", SMS, purchased=5 * C)
    await reserve(store, "s:1", 60, {"c1": terms(C)}, open_as=opening())
    await store.debit_sms(sms("m{1}", {"ag": 1}))
    prefix = store._prefix
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        keys = {key async for key in client.scan_iter(match=prefix + "*")}
        outbox_type = await client.type(f"{prefix}{{ag}}:outbox")
    finally:
        await client.aclose()
    tag = f"{prefix}{{ag}}:"
    assert keys == {
        f"{prefix}agencies",
        f"{tag}w:c1:1",
        f"{tag}w:ag:2",
        f"{tag}topups",
        f"{tag}s:s:1",
        f"{tag}live",
        f"{tag}cc:c1",
        f"{tag}sms:c1:m{{1}}",
        f"{tag}outbox",
        f"{tag}m",
    }
    assert outbox_type == "stream"


async def test_ping_says_whether_the_state_was_loaded(store: HotStore) -> None:
    if store.sharded:
        # a cluster loses its shards one by one: emptiness is seen agency by agency, and
        # the store-wide check only says whether some primary answers
        assert await store.ping()
        assert await store.agencies_present([AGENCY]) == set()
        await store.load([(AGENCY, WalletState("c1", VOICE, WalletConfig(), 0, 0))], [], ())
        assert await store.ping() and await store.agencies_present([AGENCY]) == {AGENCY}
        return
    assert not await store.ping()  # nothing was loaded yet: a new process, or a Redis that lost its data
    await store.load([], [])
    assert await store.ping()


async def test_redis_script_cache_flush(redis_store: RedisHotStore) -> None:
    store = redis_store
    await wallet(store, "ag", purchased=5 * C)
    assert (await reserve(store, "s1", 60, {"ag": terms(C)}, open_as=opening())).granted_seconds == 60
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.script_flush()
    finally:
        await client.aclose()
    # NOSCRIPT: the script is loaded again and the call goes through
    assert (await reserve(store, "s1", 60, {"ag": terms(C, 60)})).total_granted_seconds == 120
    assert (await store.settle(SettleRequest("s1", AGENCY, 60, {"ag": C}, T0))).charged == {"ag": C}


async def test_redis_learns_anchor_days_it_was_not_told(redis_store: RedisHotStore) -> None:
    await wallet(redis_store, "c1", free=C, anchor_day=20, free_allowance_micros=C)
    # another replica: it has never seen this account's configuration
    other = RedisHotStore(REDIS_URL, redis_store._prefix)
    try:
        later = T0 + 40 * 86400
        state = await other.read_wallet(AGENCY, "c1", VOICE, later)
        assert state is not None
        assert (state.period_start, state.period_end) == period_bounds_epoch(later, 20)
        # and it takes the records the first store wrote (its first call sweeps every agency)
        kinds = [r.kind for _, r in await other.take_records(10) if isinstance(r, LedgerRecord)]
        assert kinds == [EntryKind.FREE_EXPIRY, EntryKind.FREE_ALLOWANCE]
    finally:
        await other.close()


async def test_redis_unreachable_is_store_unavailable() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = RedisHotStore(f"redis://127.0.0.1:{port}/0", f"creditd-test-{RUN}-down:")
    try:
        with pytest.raises(StoreUnavailable):
            await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.read_wallet(AGENCY, "ag", VOICE, T0)
        with pytest.raises(StoreUnavailable):
            await reserve(store, "s1", 60, {"ag": terms(C)}, open_as=opening())
        with pytest.raises(StoreUnavailable):
            await store.settle(SettleRequest("s1", AGENCY, 0, {}, T0))
        with pytest.raises(StoreUnavailable):
            await store.take_records(10)
        with pytest.raises(StoreUnavailable):
            await store.load([], [SessionState("s", AGENCY, "c1", 1, 1, "x", "open", 0, {}, T0)])
    finally:
        await store.close()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
async def test_redis_crash_then_reload() -> None:
    """A private Redis dies (StoreUnavailable), comes back empty, and load() rebuilds it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

    async def start() -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        for _ in range(100):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                return process
            await asyncio.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    async def stop(process: asyncio.subprocess.Process) -> None:
        if process.returncode is None:
            process.terminate()
            await asyncio.wait_for(process.wait(), 5)

    process = await start()
    store = RedisHotStore(f"redis://127.0.0.1:{port}/0")
    try:
        await store.load([], [])
        await wallet(store, "ag", purchased=5 * C)
        before = await read(store, "ag")
        await stop(process)
        with pytest.raises(StoreUnavailable):
            await store.read_wallet(AGENCY, "ag", VOICE, T0)
        with pytest.raises(StoreUnavailable):
            await store.ping()
        process = await start()
        assert not await store.ping()  # it lost everything, and says so for each agency
        with pytest.raises(StoreUnavailable):
            await store.read_wallet(AGENCY, "ag", VOICE, T0)
        await store.load([(AGENCY, before)], [])
        assert await store.ping()
        assert await read(store, "ag") == before
    finally:
        await store.close()
        await stop(process)


async def test_redis_lua_division_is_exact() -> None:
    """idiv/muldiv in _lib.lua against Python's integers, near and beyond 2**53 products."""
    lib = resources.files("creditd.store").joinpath("lua", "_lib.lua").read_text("utf-8")
    probe = lib + (
        "\nlocal out = {}\n"
        "for i = argi, #ARGV, 3 do\n"
        "  local x, k, d = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])\n"
        "  out[#out + 1] = fmt(muldiv_floor(x, k, d)) .. ' ' .. fmt(muldiv_ceil(x, k, d))\n"
        "end\nreturn out\n"
    )
    rng = random.Random(7)
    cases: list[tuple[int, int, int]] = []
    for _ in range(300):
        x = rng.choice([rng.randrange(10**14), rng.randrange(2 * 10**14), 10**14 - rng.randrange(100)])
        cases.append((x, 60, rng.choice([1, 7, 59, 60, 61, 166_667, rng.randrange(1, 10**10 + 1), 10**10])))
        rate = rng.randrange(1, 10**10 + 1)
        cases.append((rate, rng.randrange(604_800 + 3600), 60))
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        args: list[int | str] = ["p", "0", 0]
        for case in cases:
            args += list(case)
        reply = await client.eval(probe, 0, *args)  # type: ignore[misc]
    finally:
        await client.aclose()
    expected = [f"{x * k // d} {-(-x * k // d)}" for x, k, d in cases]
    assert reply == expected


def test_record_json_round_trip() -> None:
    records: list[Record] = [
        LedgerRecord(new_id(), "c1", SMS, EntryKind.TOPUP, 10**14, 0, 10**14, 0, T0 + 0.25, TopupKind.REFUND,
                     idempotency_key="k{1}", external_ref="stripe:\u00e9", seconds=3),
        EventRecord(new_id(), "c1", EventType.TOPUP_APPLIED, VOICE, T0, 5, "key", "s", 2, {"kind": "GRANT"}),
        SessionRecord("s \"1\"", "c1", "ag", 1, 2, "x", "open", 60, 0, {"c1": 1, "ag": 2}, {}, T0),
    ]  # fmt: skip
    for record in records:
        assert decode_record(encode_record(record)) == record


# -- the same behaviour, operation by operation ----------------------------------------------

ACCOUNTS = {"ag": (True, False), "c1": (True, True), "c2": (False, True)}  # has wallet, is a client
CLIENTS = ["c1", "c2"]
BALANCES = [VOICE, SMS]


def wallet_configs(account: str) -> st.SearchStrategy[WalletConfig]:
    has_wallet, client = ACCOUNTS[account]
    refills = st.builds(
        RefillSettings,
        enabled=st.booleans(),
        threshold_micros=st.sampled_from([0, C, 10 * C]),
        amount_micros=st.sampled_from([0, 5 * C]),
        target_balance_micros=st.sampled_from([0, 25 * C]),
        max_per_period=st.integers(0, 2),
    )
    return st.builds(
        WalletConfig,
        has_wallet=st.just(has_wallet),
        free_allowance_micros=st.sampled_from([0, 500_000, 3 * C]) if has_wallet else st.just(0),
        usage_limit_micros=st.sampled_from([0, 2 * C, 20 * C]) if client else st.just(0),
        anchor_day=st.sampled_from([1, 15, 28]),
        refill=st.none() | refills,
        low_balance_threshold_micros=st.sampled_from([0, C, 10 * C]),
    )


def _configure(account: str) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.tuples(st.just("configure"), st.just(account), st.sampled_from(BALANCES), wallet_configs(account))


RESERVE = st.tuples(
    st.just("reserve"),
    st.integers(0, 2),  # session
    st.sampled_from(CLIENTS),
    st.sampled_from([1, 30, 60, 600]),
    st.sampled_from([0, 166_667, C, 3 * C]),  # client rate
    st.sampled_from([166_667, C]),  # agency rate
    st.integers(0, 2),  # concurrency cap
    st.booleans(),  # send SessionOpen for a session that exists
)
SETTLE = st.tuples(st.just("settle"), st.integers(0, 2), st.integers(0, 100), st.sampled_from([0, 1, 6]))
SMS_SEND = st.tuples(
    st.just("sms"),
    st.integers(0, 3),  # message
    st.sampled_from(CLIENTS),
    st.integers(1, 3),
    st.sampled_from([0, 166_000, C]),
    st.sampled_from([166_000, 2 * C]),
    st.sampled_from(["US", "GB"]),
)
OPERATIONS = st.one_of(
    st.sampled_from(list(ACCOUNTS)).flatmap(_configure),
    st.tuples(
        st.just("topup"),
        st.sampled_from(list(ACCOUNTS)),
        st.sampled_from(BALANCES),
        st.sampled_from([0, C, 10 * C]),
        st.sampled_from([0, 250_000, 10 * C]),
        st.integers(0, 3),
    ),
    RESERVE,
    RESERVE,
    RESERVE,
    SETTLE,
    SETTLE,
    SMS_SEND,
    SMS_SEND,
    st.tuples(st.just("advance"), st.sampled_from([1, 3600, 9 * 86400, 17 * 86400, 35 * 86400])),
    st.tuples(st.just("read"), st.sampled_from(list(ACCOUNTS)), st.sampled_from(BALANCES)),
    st.tuples(st.just("append"), st.sampled_from(list(ACCOUNTS))),
)


class Driver:
    """Sends one operation to a store; both stores get identical requests."""

    def __init__(self) -> None:
        self.now = T0
        self.tariffs: dict[str, dict[str, Tariff]] = {}  # session -> payer -> tariff
        self.client: dict[str, str] = {}
        self.granted: dict[str, int] = {}

    def request(self, op: tuple[Any, ...]) -> tuple[str, Any]:
        name = op[0]
        if name == "configure":
            _, account, balance_type, config = op
            return name, (AGENCY, account, balance_type, config, self.now)
        if name == "topup":
            _, account, balance_type, free, purchased, n = op
            entry = topup_entry(account, balance_type, free, purchased, entry_id=f"e{n}-{account}-{int(balance_type)}")
            return name, (AGENCY, entry, self.now)
        if name == "reserve":
            _, n, client, want, client_rate, agency_rate, cap, reopen = op
            session_id = f"s{n}"
            tariffs = self.tariffs.get(session_id)
            open_as = None
            if tariffs is None or reopen:
                client = self.client.get(session_id, client)
                open_as = SessionOpen(client, 1, 1, "deepgram", cap, T0 + 60)
            else:
                client = self.client[session_id]
            granted = self.granted.get(session_id, 0)
            rates = {client: client_rate, AGENCY: agency_rate}
            if tariffs is None:
                tariffs = {account: Tariff() for account in rates}
            payers = []
            for account, tariff in tariffs.items():
                candidate = Tariff(list(tariff.segments))
                candidate.price_from(granted, rates.get(account, agency_rate))
                payers.append(Payer(account, candidate.terms(granted)))
            lease = self.now + want + 45
            request = ReserveRequest(
                session_id, AGENCY, VOICE, want, tuple(payers), self.now, lease, open_as, epoch=0 if open_as else 1
            )
            return name, (request, rates)
        if name == "settle":
            _, n, percent, cutoff = op
            session_id = f"s{n}"
            billed = self.granted.get(session_id, 0) * percent // 100
            tariffs = self.tariffs.get(session_id, {})
            costs = {account: tariff.cost(billed) for account, tariff in tariffs.items()}
            return name, SettleRequest(session_id, AGENCY, billed, costs, self.now, cutoff)
        if name == "sms":
            _, n, client, segments, client_rate, agency_rate, country = op
            costs = {client: client_rate * segments, AGENCY: agency_rate * segments}
            return name, SmsDebitRequest(f"m{n}", "sms", AGENCY, client, segments, costs, self.now, country)
        if name == "read":
            _, account, balance_type = op
            return name, (AGENCY, account, balance_type, self.now)
        if name == "append":
            record = EventRecord(new_id(), op[1], EventType.CUTOFF, SMS, self.now, session_id="sms", reason=1)
            return name, [record]
        return name, None

    def applied(self, name: str, request: Any, result: Any) -> None:
        """Follow what the store did (the tariffs of sessions that reserved something)."""
        if name == "reserve" and isinstance(result, ReserveResult) and result.granted_seconds > 0:
            reserve_request, rates = request
            session_id = reserve_request.session_id
            granted = self.granted.get(session_id, 0)
            tariffs = self.tariffs.setdefault(session_id, {account: Tariff() for account in rates})
            for account, tariff in tariffs.items():
                tariff.price_from(granted, rates.get(account, rates[AGENCY]))
            if reserve_request.open is not None:
                self.client.setdefault(session_id, reserve_request.open.client_id)
            self.granted[session_id] = result.total_granted_seconds


async def perform(store: HotStore, name: str, request: Any) -> Any:
    try:
        if name == "configure":
            return [anonymous(r) for r in await store.configure_wallet(*request, new_agency=True)]
        if name == "topup":
            return await store.apply_topup(*request)
        if name == "reserve":
            return await store.reserve(request[0])
        if name == "settle":
            return await store.settle(request)
        if name == "sms":
            return await store.debit_sms(request)
        if name == "read":
            return await store.read_wallet(*request)
        if name == "append":
            return await store.append_records(AGENCY, request)
    except (CreditdError, ValueError) as exc:
        return (type(exc).__name__, getattr(exc, "reason", ""), str(exc))
    return None


def raw_wallet(store: HotStore, account: str, balance_type: BalanceType) -> Any:
    if isinstance(store, EmbeddedHotStore):
        return store._wallets.get((account, balance_type))
    raise TypeError(store)


async def snapshot(store: HotStore) -> dict[str, Any]:
    """Wallets as stored (no period roll) and sessions."""
    found: dict[str, Any] = {}
    for account in ACCOUNTS:
        for balance_type in BALANCES:
            if isinstance(store, RedisHotStore):
                state = await store.snapshot_wallet(AGENCY, account, balance_type)
            else:
                state = raw_wallet(store, account, balance_type)
            found[f"{account}:{balance_type.name}"] = state
    for n in range(5):
        found[f"s{n}"] = await store.session(AGENCY, f"s{n}")
    found["live"] = sorted(s.session_id for s in await store.live_sessions(AGENCY))
    return found


def _outcome(name: str, result: Any) -> str:
    if isinstance(result, tuple):
        return f"{name}: {result[0]} {result[1]}"
    if isinstance(result, ReserveResult):
        limited = result.limited_by[1].value if result.limited_by else "-"
        granted = "granted" if result.granted_seconds else "nothing"
        return f"reserve: {granted}, limited by {limited}, concurrency denied {result.concurrency_denied}"
    if isinstance(result, SmsDebitResult):
        return f"sms: allowed {result.allowed}, duplicate {result.duplicate}"
    if isinstance(result, SettleResult):
        return f"settle: already settled {result.already_settled}"
    return name


def _record_kind(record: Record) -> str:
    if isinstance(record, LedgerRecord):
        return f"record {record.kind.name}"
    if isinstance(record, EventRecord):
        return f"record {record.type.name}"
    return f"record session {record.status}"


CONFIGS = st.tuples(*(wallet_configs(account) for account in ACCOUNTS for _ in BALANCES))
FUNDS = st.tuples(*(st.sampled_from([(0, 0), (C, 2 * C), (C, 20 * C)]) for _ in ACCOUNTS for _ in BALANCES))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs=CONFIGS, funds=FUNDS, operations=st.lists(OPERATIONS, min_size=5, max_size=40))
async def test_both_stores_behave_the_same(
    configs: tuple[WalletConfig, ...], funds: tuple[tuple[int, int], ...], operations: list[tuple[Any, ...]]
) -> None:
    """The same operations on both stores: the same results, states and outbox records."""
    await behave_the_same("redis", REDIS_URL, configs, funds, operations)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(configs=CONFIGS, funds=FUNDS, operations=st.lists(OPERATIONS, min_size=5, max_size=40))
async def test_both_stores_behave_the_same_on_redis_cluster(
    redis_cluster: LocalRedisCluster,
    configs: tuple[WalletConfig, ...],
    funds: tuple[tuple[int, int], ...],
    operations: list[tuple[Any, ...]],
) -> None:
    """The scripts run on a cluster node as on one Redis (fewer examples: the rules are the same)."""
    await behave_the_same("redis-cluster", redis_cluster.url, configs, funds, operations)


async def behave_the_same(
    kind: str,
    url: str,
    configs: tuple[WalletConfig, ...],
    funds: tuple[tuple[int, int], ...],
    operations: list[tuple[Any, ...]],
) -> None:
    async with open_store("embedded") as embedded, open_store(kind, url) as redis_store:
        stores = (embedded, redis_store)
        driver = Driver()
        wallets = itertools.product(ACCOUNTS, BALANCES)
        for (account, balance_type), config, (free, purchased) in zip(wallets, configs, funds, strict=True):
            initial = topup_entry(account, balance_type, free, purchased, f"initial-{account}-{int(balance_type)}")
            for store in stores:
                await store.configure_wallet(AGENCY, account, balance_type, config, T0, new_agency=True)
                await store.apply_topup(AGENCY, initial, T0)
        for step, op in enumerate(operations):
            if op[0] == "advance":
                driver.now += op[1]
                continue
            name, request = driver.request(op)
            results = [await perform(store, name, request) for store in stores]
            assert results[0] == results[1], f"step {step}: {op}"
            driver.applied(name, request, results[0])
            states = [await snapshot(store) for store in stores]
            assert states[0] == states[1], f"step {step}: {op}"
            outboxes = [[anonymous(r) for r in await drain(store)] for store in stores]
            assert outboxes[0] == outboxes[1], f"step {step}: {op}"  # the same records, in the same order
            assert Counter(map(repr, outboxes[0])) == Counter(map(repr, outboxes[1]))
            event(_outcome(name, results[0]))
            for record in outboxes[0]:
                event(_record_kind(record))


async def test_embedded_store_forgets_finished_sessions_and_messages_after_the_retention() -> None:
    store = EmbeddedHotStore(retention_seconds=60)
    await store.load([], [])
    await wallet(store, "ag", purchased=5 * C)
    assert (await reserve(store, "s1", 60, {"ag": terms(C)}, open_as=opening())).granted_seconds == 60
    await store.settle(SettleRequest("s1", AGENCY, 60, {"ag": C}, T0))
    assert (await store.session(AGENCY, "s1")) is not None  # still answers retries
    assert (await reserve(store, "s2", 60, {"ag": terms(C)}, open_as=opening())).granted_seconds == 60
    await store.settle(SettleRequest("s2", AGENCY, 60, {"ag": C}, T0 + 61))
    assert await store.session(AGENCY, "s1") is None  # past the retention
    assert await store.session(AGENCY, "s2") is not None
