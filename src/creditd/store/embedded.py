"""The embedded hot store: balances and live sessions in this process.

Every method runs from start to end without awaiting anything, so on one event loop each
one is atomic, the same unit a Redis Lua script is. It serves one replica; several
replicas need the Redis store.
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import replace

from creditd.domain.records import (
    BalanceType,
    EntryKind,
    EventRecord,
    EventType,
    LedgerRecord,
    Record,
    SessionRecord,
    new_id,
)
from creditd.domain.tariff import price_from
from creditd.domain.wallet import Constraint, WalletConfig, WalletState, new_wallet
from creditd.errors import FailedPrecondition, NotFound
from creditd.store.base import (
    HotStore,
    ReserveRequest,
    ReserveResult,
    SessionState,
    SessionTakenOver,
    SettleRequest,
    SettleResult,
    SmsDebitRequest,
    SmsDebitResult,
    message_id_reused,
)

# Settled sessions and SMS results are kept this long for idempotent retries, then dropped.
RETENTION_SECONDS = 24 * 3600


class EmbeddedHotStore(HotStore):
    def __init__(self, retention_seconds: float = RETENTION_SECONDS) -> None:
        super().__init__()
        self._retention = retention_seconds
        # (kind, (agency or client, id)) -> when finished
        self._finished: OrderedDict[tuple[str, tuple[str, str]], float] = OrderedDict()
        self._wallets: dict[tuple[str, BalanceType], WalletState] = {}
        self._sessions: dict[tuple[str, str], SessionState] = {}  # (agency, session id) -> state
        self._live: dict[str, set[str]] = {}  # client -> its open sessions
        self._loaded = False
        self._sms: dict[tuple[str, str], tuple[str, SmsDebitResult]] = {}  # (client, id) -> parameters, result
        self._topups: set[str] = set()
        self._outbox: OrderedDict[str, Record] = OrderedDict()
        self._ids = itertools.count(1)

    # -- helpers -----------------------------------------------------------------------

    def _emit(self, records: Sequence[Record]) -> None:
        for record in records:
            self._outbox[str(next(self._ids))] = record

    def _wallet(self, account_id: str, balance_type: BalanceType, now: float) -> WalletState:
        wallet = self._wallets.get((account_id, balance_type))
        if wallet is None:
            raise NotFound(f"no {balance_type.name.lower()} wallet for {account_id}", account_id=account_id)
        self._emit(wallet.roll_period(now))
        return wallet

    def _session_record(self, state: SessionState, now: float) -> SessionRecord:
        return SessionRecord(
            session_id=state.session_id,
            client_id=state.client_id,
            agency_id=state.agency_id,
            channel=state.channel,
            direction=state.direction,
            provider=state.provider,
            status=state.status,
            granted_seconds=state.granted_seconds,
            billed_seconds=state.billed_seconds,
            reserved=dict(state.reserved),
            charged=dict(state.charged),
            updated_at=now,
            cutoff_reason=state.cutoff_reason,
            started_at=state.started_at,
        )

    async def ping(self) -> bool:
        """False until loaded: a new process starts empty and must be rebuilt first."""
        return self._loaded

    def _retire(self, kind: str, key: tuple[str, str], now: float) -> None:
        """Remember a finished session or message for the retention period; forget older ones."""
        self._finished[(kind, key)] = now
        while self._finished:
            (old_kind, old_key), when = next(iter(self._finished.items()))
            if now - when < self._retention:
                break
            self._finished.popitem(last=False)
            if old_kind == "sms":
                self._sms.pop(old_key, None)
            else:
                self._sessions.pop(old_key, None)

    # -- configuration and reads -------------------------------------------------------

    async def configure_wallet(
        self,
        agency_id: str,
        account_id: str,
        balance_type: BalanceType,
        config: WalletConfig,
        now: float,
        *,
        new_agency: bool = False,
    ) -> list[Record]:
        wallet = self._wallets.get((account_id, balance_type))
        if wallet is None:
            self._wallets[(account_id, balance_type)] = new_wallet(account_id, balance_type, config, now)
            return []
        wallet.config = config
        if config.usage_limit_micros <= 0 or (wallet.limit_available() or 0) > 0:
            wallet.limit_notified = False
        records: list[Record] = list(wallet.roll_period(now))
        self._emit(records)
        return records

    async def read_wallet(
        self, agency_id: str, account_id: str, balance_type: BalanceType, now: float
    ) -> WalletState | None:
        if (account_id, balance_type) not in self._wallets:
            return None
        return copy.copy(self._wallet(account_id, balance_type, now))

    async def session(self, agency_id: str, session_id: str) -> SessionState | None:
        return self._sessions.get((agency_id, session_id))

    async def live_sessions(self, agency_id: str, skip: Collection[str] = ()) -> list[SessionState]:
        return [
            s
            for s in self._sessions.values()
            if s.agency_id == agency_id and s.status == "open" and s.session_id not in skip
        ]

    # -- the atomic operations ---------------------------------------------------------

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        state = self._sessions.get((request.agency_id, request.session_id))
        if request.open is not None:
            if state is not None:
                return ReserveResult(0, state.granted_seconds, None, reserved=dict(state.reserved))
            cap = request.open.max_concurrent
            live = len(self._live.get(request.open.client_id, ()))
            if cap and live >= cap:
                return ReserveResult(0, 0, None, concurrency_denied=True)
        elif state is None or state.status != "open":
            raise FailedPrecondition("the session is not open", "SESSION_NOT_OPEN", session_id=request.session_id)
        elif state.epoch != request.epoch:
            raise SessionTakenOver(request.session_id)

        wallets = [self._wallet(p.account_id, request.balance_type, request.now) for p in request.payers]
        granted = state.granted_seconds if state else 0
        limits: list[tuple[int, str, Constraint]] = []
        for payer, wallet in zip(request.payers, wallets, strict=True):
            headroom, constraint = wallet.headroom()
            seconds = payer.terms.affordable(headroom)
            if seconds is not None and constraint is not None:
                limits.append((seconds, payer.account_id, constraint))
        headroom_seconds = min((s for s, _, _ in limits), default=None)
        seconds = request.want_seconds
        if headroom_seconds is not None:
            seconds = min(seconds, headroom_seconds)
        limited_by = None
        if headroom_seconds is not None and headroom_seconds < request.want_seconds:
            _, account_id, constraint = min(limits, key=lambda item: item[0])
            limited_by = (account_id, constraint)
            if constraint is Constraint.LIMIT:
                wallet = wallets[[p.account_id for p in request.payers].index(account_id)]
                self._emit(wallet.limit_reached(request.now))
        if seconds <= 0:
            reserved = dict(state.reserved) if state else {}
            return ReserveResult(0, granted, headroom_seconds, limited_by, reserved=reserved)

        reserved = dict(state.reserved) if state else {}
        for payer, wallet in zip(request.payers, wallets, strict=True):
            micros = payer.terms.needed(seconds)
            before = wallet.alert_level()
            wallet.reserve(micros)
            reserved[payer.account_id] = reserved.get(payer.account_id, 0) + micros
            self._emit(wallet.alerts(before, request.now))
        if state is None:
            assert request.open is not None
            state = SessionState(
                session_id=request.session_id,
                agency_id=request.agency_id,
                client_id=request.open.client_id,
                channel=request.open.channel,
                direction=request.open.direction,
                provider=request.open.provider,
                status="open",
                granted_seconds=0,
                reserved={},
                expires_at=request.lease_until,
                authorized_until=request.open.authorized_until,
            )
        tariffs = {account: list(segments) for account, segments in state.tariffs.items()}
        for payer in request.payers:
            price_from(tariffs.setdefault(payer.account_id, []), granted, payer.terms.rate)
        state = replace(
            state,
            granted_seconds=granted + seconds,
            reserved=reserved,
            expires_at=request.lease_until,
            tariffs=tariffs,
        )
        self._sessions[(request.agency_id, request.session_id)] = state
        self._live.setdefault(state.client_id, set()).add(state.session_id)
        self._emit([self._session_record(state, request.now)])
        return ReserveResult(seconds, state.granted_seconds, headroom_seconds, limited_by, reserved=reserved)

    async def settle(self, request: SettleRequest) -> SettleResult:
        state = self._sessions.get((request.agency_id, request.session_id))
        if state is None:
            raise NotFound("no such session", "SESSION_NOT_FOUND", session_id=request.session_id)
        if state.status == "settled":
            return SettleResult(state.billed_seconds, dict(state.charged), True, state.cutoff_reason)
        if request.epoch and request.epoch != state.epoch:
            raise SessionTakenOver(request.session_id)
        # Every check before the first change, so a failure leaves everything as it was.
        for account_id, reserved in state.reserved.items():
            held = self._wallets.get((account_id, BalanceType.VOICE))
            if held is None:
                raise NotFound(f"no voice wallet for {account_id}", account_id=account_id)
            if reserved > held.reserved_micros:
                raise FailedPrecondition("the reservation is not held", "RESERVATION_MISSING", account_id=account_id)
        charged: dict[str, int] = {}
        for account_id, reserved in state.reserved.items():
            cost = min(request.costs.get(account_id, 0), reserved)
            wallet = self._wallet(account_id, BalanceType.VOICE, request.now)
            before = wallet.alert_level()
            free, purchased = wallet.settle(reserved, cost)
            charged[account_id] = cost
            self._emit([_usage_entry(wallet, EntryKind.VOICE_USAGE, free, purchased, cost, request, state)])
            self._emit(wallet.alerts(before, request.now))
        if request.cutoff_reason:
            self._emit([_cutoff_event(state, request)])
        state = replace(
            state,
            status="settled",
            billed_seconds=request.billed_seconds,
            charged=charged,
            cutoff_reason=request.cutoff_reason,
        )
        self._sessions[(request.agency_id, request.session_id)] = state
        self._live.get(state.client_id, set()).discard(state.session_id)
        self._retire("session", (state.agency_id, state.session_id), request.now)
        self._emit([self._session_record(state, request.now)])
        return SettleResult(request.billed_seconds, charged, False, request.cutoff_reason)

    async def claim(
        self, agency_id: str, session_id: str, client_id: str, now: float, lease_until: float
    ) -> SessionState | None:
        state = self._sessions.get((agency_id, session_id))
        if state is None or state.channel != 1 or state.client_id != client_id:
            return None
        if state.status == "settled":
            return state
        if not state.started_at and now > state.authorized_until:
            return replace(state, status="expired")
        answered = not state.started_at
        state = replace(
            state,
            epoch=state.epoch + 1,
            started_at=state.started_at or now,
            expires_at=max(state.expires_at, lease_until),
        )
        self._sessions[(agency_id, session_id)] = state
        if answered:  # the database learns that the call was answered (see durability.rebuild)
            self._emit([self._session_record(state, now)])
        return state

    async def debit_sms(self, request: SmsDebitRequest) -> SmsDebitResult:
        key = (request.client_id, request.message_id)
        parameters = request.parameters()
        seen = self._sms.get(key)
        if seen is not None:
            if seen[0] != parameters:
                raise message_id_reused(request)
            return replace(seen[1], duplicate=True)
        wallets = [self._wallet(account, BalanceType.SMS, request.now) for account in request.costs]
        for wallet, cost in zip(wallets, request.costs.values(), strict=True):
            headroom, constraint = wallet.headroom()
            if headroom is not None and constraint is not None and headroom < cost:
                if constraint is Constraint.LIMIT:
                    self._emit(wallet.limit_reached(request.now))
                return SmsDebitResult(False, {}, (wallet.account_id, constraint))
        for wallet, cost in zip(wallets, request.costs.values(), strict=True):
            before = wallet.alert_level()
            free, purchased = wallet.debit(cost)
            self._emit([_usage_entry(wallet, EntryKind.SMS_USAGE, free, purchased, cost, request)])
            self._emit(wallet.alerts(before, request.now))
        result = SmsDebitResult(True, dict(request.costs))
        self._sms[key] = (parameters, result)
        self._retire("sms", key, request.now)
        return result

    async def apply_topup(self, agency_id: str, entry: LedgerRecord, now: float) -> WalletState:
        wallet = self._wallet(entry.account_id, entry.balance_type, now)
        if entry.entry_id not in self._topups:
            self._topups.add(entry.entry_id)
            wallet.credit(entry.free_micros, to_free=True)
            wallet.credit(entry.purchased_micros, to_free=False)
            if (wallet.limit_available() or 0) > 0:
                wallet.limit_notified = False
        return copy.copy(wallet)

    async def append_records(self, agency_id: str, records: list[Record]) -> None:
        self._emit(records)

    # -- outbox and rebuild ------------------------------------------------------------

    async def take_records(self, limit: int) -> list[tuple[str, Record]]:
        return list(itertools.islice(self._outbox.items(), limit))

    async def ack_records(self, ids: list[str]) -> None:
        for record_id in ids:
            self._outbox.pop(record_id, None)

    async def load(
        self,
        wallets: list[tuple[str, WalletState]],
        sessions: list[SessionState],
        applied_topups: Collection[tuple[str, str]] = (),
    ) -> None:
        self._wallets = {(w.account_id, w.balance_type): w for _, w in wallets}
        self._sessions = {(s.agency_id, s.session_id): s for s in sessions}
        self._live = {}
        for state in sessions:
            if state.status == "open":
                self._live.setdefault(state.client_id, set()).add(state.session_id)
        self._loaded = True
        self._sms.clear()
        self._topups = {entry_id for _, entry_id in applied_topups}


def _cutoff_event(state: SessionState, request: SettleRequest) -> EventRecord:
    return EventRecord(
        event_id=new_id(),
        account_id=state.client_id,
        type=EventType.CUTOFF,
        balance_type=BalanceType.VOICE if state.channel == 1 else BalanceType.SMS,
        created_at=request.now,
        session_id=state.session_id,
        reason=request.cutoff_reason,
        attributes={"billed_seconds": str(request.billed_seconds)},
    )


def _usage_entry(
    wallet: WalletState,
    kind: EntryKind,
    free: int,
    purchased: int,
    usage: int,
    request: SettleRequest | SmsDebitRequest,
    session: SessionState | None = None,
) -> LedgerRecord:
    if isinstance(request, SmsDebitRequest):
        message_id, quantity = request.message_id, request.segments
        client_id, provider, country = request.client_id, "", request.destination_country
    else:
        assert session is not None
        message_id, quantity = "", request.billed_seconds
        client_id, provider, country = session.client_id, session.provider, ""
    return LedgerRecord(
        entry_id=new_id(),
        account_id=wallet.account_id,
        balance_type=wallet.balance_type,
        kind=kind,
        amount_micros=-(free + purchased),
        free_micros=-free,
        purchased_micros=-purchased,
        usage_micros=usage,
        created_at=request.now,
        session_id=request.session_id,
        message_id=message_id,
        seconds=quantity,
        client_id=client_id,
        provider=provider,
        destination_country=country,
    )
