"""Live voice sessions: slices reserved ahead of need, a warning, a cutoff on time.

Every voice session of this process is a small record (`VoiceSession`) with one entry in
the process's timer heap (`Scheduler`); no task, lock or queue is kept per call. When a
session's deadline comes, `VoiceEngine` decides what it is for:

- AUTHORIZED (Authorize answered, no stream yet): at `authorized_until` the reservation is
  released (settled at 0 s, SESSION_ABANDONED).
- LIVE: `renewal_lead` seconds before the grant ends, one more slice is reserved on every
  payer. When nothing more can be reserved the grant in hand is final: the worker gets a
  LowCreditWarning `warning_seconds` before its end and a Cutoff at its exact end. A stream
  that drops leaves the session resumable until the grace period ends; then it is settled
  as used until then (or until the grant's end, if that comes first).
- SETTLING: the settlement is in flight (or waits for the store to answer again).

The renewals and settlements that come due in one turn of the event loop go to the store
as one batch. A cutoff is sent the moment the grant ends, before its settlement has been
written: what it bills is already decided (everything granted), so the call stops on time
even when the store is slow.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from collections.abc import Coroutine
from typing import Any

from creditd.domain.accounts import Direction, Parties
from creditd.domain.records import BalanceType, DenyReason
from creditd.domain.tariff import Tariff
from creditd.engine.context import Context
from creditd.engine.messages import CutoffMsg, GrantMsg, Message, SummaryMsg, WarningMsg
from creditd.engine.pricing import parties
from creditd.engine.scheduler import Scheduled, Scheduler
from creditd.errors import CreditdError, InvalidArgument, NotFound, StoreUnavailable
from creditd.store.base import (
    Payer,
    ReserveRequest,
    ReserveResult,
    SessionState,
    SessionTakenOver,
    SettleRequest,
    SettleResult,
)

log = logging.getLogger(__name__)
RETRY_SECONDS = 0.5  # a store that did not answer is asked again this much later
_EARLY = 0.001  # a timer may fire this much before its deadline (clock conversions)


class State(enum.IntEnum):
    AUTHORIZED = 1
    LIVE = 2
    SETTLING = 3
    SETTLED = 4


class Outbox:
    """Messages on their way to one stream's caller (a voice or an SMS session's)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Message | CreditdError] = []
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: Message | CreditdError) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Message | CreditdError:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class VoiceSession:
    __slots__ = (
        "agency_id",
        "authorized_until",
        "busy",
        "client_id",
        "detached_until",
        "direction",
        "epoch",
        "exhausted",
        "final",
        "granted",
        "last_reported",
        "provider",
        "retry_at",
        "session_id",
        "started_at",
        "state",
        "stop_reason",
        "stop_seconds",
        "stream",
        "tariffs",
        "timer_gen",
        "warned",
    )

    def __init__(
        self,
        session_id: str,
        client_id: str,
        agency_id: str,
        direction: Direction,
        provider: str,
        tariffs: dict[str, Tariff],
        granted: int,
        authorized_until: float,
    ) -> None:
        self.session_id = session_id
        self.client_id = client_id
        self.agency_id = agency_id
        self.direction = direction
        self.provider = provider
        self.tariffs = tariffs  # payer account id -> what it owes, by cumulative second
        self.granted = granted  # cumulative seconds reserved on every payer
        self.authorized_until = authorized_until  # wall time the authorization is released
        self.state = State.AUTHORIZED
        self.started_at = 0.0  # wall time of the first SessionStart
        self.exhausted = DenyReason.NONE  # why nothing more can be reserved, for now
        self.retry_at = 0.0  # no renewal before this (the store did not answer)
        self.warned = False
        self.last_reported = 0
        self.stream: Outbox | None = None
        self.detached_until: float | None = None  # the stream dropped: resumable until then
        self.busy = False  # a reservation or settlement is in flight
        self.stop_reason: DenyReason | None = None  # set once the session is to be settled
        self.stop_seconds = 0  # SessionEnd: the seconds used; a cutoff: the seconds billed
        self.final: Message | None = None
        self.timer_gen = 0
        self.epoch = 1  # this process's claim on the session (see HotStore.claim)

    @property
    def key(self) -> tuple[str, str]:
        return (self.agency_id, self.session_id)

    @property
    def grant_end(self) -> float:
        return self.started_at + self.granted

    def elapsed_seconds(self, now: float) -> int:
        """Seconds of talk so far, per started second, never beyond the grant."""
        if self.state is State.AUTHORIZED:
            return 0
        return min(self.granted, max(0, math.ceil(now - self.started_at)))

    def grant(self) -> GrantMsg:
        return GrantMsg(self.granted, self.grant_end)

    def send(self, message: Message | CreditdError) -> None:
        if self.stream is not None:
            self.stream.put(message)


class VoiceEngine:
    """The voice sessions of this process and the one timer heap that drives them."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.sessions: dict[tuple[str, str], VoiceSession] = {}
        self.scheduler = Scheduler(ctx.clock, self._due)
        self._to_renew: list[VoiceSession] = []
        self._to_settle: list[VoiceSession] = []
        self._flush_pending = False
        self._work: set[asyncio.Task[None]] = set()  # batches in flight
        self._closed = False
        self._ended = asyncio.Event()  # set whenever a session leaves `sessions`

    def __len__(self) -> int:
        return len(self.sessions)

    def get(self, agency_id: str, session_id: str) -> VoiceSession | None:
        return self.sessions.get((agency_id, session_id))

    # -- from Authorize and the streams ------------------------------------------------

    def authorized(self, session: VoiceSession) -> None:
        self.sessions[session.key] = session
        self.scheduler.schedule(session, session.authorized_until)

    def attach(self, session: VoiceSession, stream: Outbox) -> None:
        """SessionStart: the call is answered, or resumed on a new stream."""
        if session.final is not None:
            stream.put(session.final)
            return
        if session.stop_reason is not None:  # being settled: the final message follows
            session.stream = stream
            return
        if session.stream is not None and session.stream is not stream:
            session.stream.put(SessionTakenOver(session.session_id))
        session.stream = stream
        session.detached_until = None
        stream.put(session.grant())
        self._reschedule(session)

    def adopt(self, state: SessionState, rates: dict[str, int]) -> VoiceSession:
        """A session this process has just claimed (SessionStart): its record here, from the
        store's state (which another replica may have renewed, or authorized). `rates`
        price a session whose tariffs the store does not hold."""
        tariffs = {a: Tariff(list(segments)) for a, segments in state.tariffs.items() if segments}
        if set(tariffs) != set(state.reserved):
            tariffs = {a: Tariff([(0, rate)]) for a, rate in rates.items()}
        session = self.sessions.get((state.agency_id, state.session_id))
        if session is None:
            session = VoiceSession(
                state.session_id,
                state.client_id,
                state.agency_id,
                Direction(state.direction),
                state.provider,
                tariffs,
                state.granted_seconds,
                state.authorized_until,
            )
            self.sessions[session.key] = session
        elif session.stop_reason is DenyReason.SESSION_ABANDONED and not session.started_at:
            # The call was answered just as its authorization expired here: the claim came
            # first, so the call goes on (the release, if in flight, is stale).
            session.stop_reason = None
            session.state = State.AUTHORIZED
        if not session.busy:
            session.tariffs = tariffs
            session.granted = state.granted_seconds
        session.epoch = state.epoch
        if state.started_at and session.stop_reason is None:
            session.state = State.LIVE
            session.started_at = state.started_at
        return session

    def detach(self, session: VoiceSession, stream: Outbox) -> None:
        """The stream ended without SessionEnd: hold the session for the grace period."""
        if session.stream is stream:
            session.stream = None
            if session.state is State.LIVE and session.stop_reason is None:
                session.detached_until = self.ctx.now() + self.ctx.settings.grace_seconds
                self._reschedule(session)

    def report(self, session: VoiceSession, seconds_used: int) -> None:
        if seconds_used < session.last_reported:
            raise _decreasing(seconds_used, session.last_reported)
        session.last_reported = seconds_used

    def end(self, session: VoiceSession, seconds_used: int) -> None:
        """SessionEnd: bill the seconds used (never more than granted); a Summary follows."""
        if seconds_used < session.last_reported:
            raise _decreasing(seconds_used, session.last_reported)
        session.last_reported = seconds_used
        self._stop(session, DenyReason.NONE, seconds_used)

    def interrupt(self, session: VoiceSession, reason: DenyReason) -> None:
        """Cut the call now (an operator suspended a subscription or lowered a limit)."""
        self._stop(session, reason, session.elapsed_seconds(self.ctx.now()))

    def expire(self, session: VoiceSession) -> None:
        """Release an authorization that was never answered in time."""
        self._stop(session, DenyReason.SESSION_ABANDONED, 0)

    def credit_arrived(self, session: VoiceSession) -> None:
        """A payer was credited (or a limit raised): a call on its final grant may renew."""
        if session.exhausted in (
            DenyReason.CLIENT_CREDITS_EXHAUSTED,
            DenyReason.AGENCY_CREDITS_EXHAUSTED,
            DenyReason.USAGE_LIMIT_REACHED,
            DenyReason.SUBSCRIPTION_INACTIVE,
        ):
            session.exhausted = DenyReason.NONE
            self._reschedule(session)

    # -- timers ------------------------------------------------------------------------

    def _reschedule(self, session: VoiceSession) -> None:
        if session.busy or session.state is State.SETTLED or self._closed:
            return
        when = self._next_deadline(session)
        if when is None:
            self.scheduler.cancel(session)
        else:
            self.scheduler.schedule(session, when)

    def _next_deadline(self, session: VoiceSession) -> float | None:
        settings = self.ctx.settings
        if session.state is State.AUTHORIZED:
            return session.authorized_until
        if session.state is not State.LIVE:
            return None
        end = session.grant_end
        when = end
        if self._renewing(session):
            when = min(when, max(end - settings.renewal_lead_seconds, session.retry_at))
        if not session.warned and (not self._renewing(session) or session.retry_at):
            when = min(when, end - settings.warning_seconds)
        if session.detached_until is not None:
            when = min(when, session.detached_until)
        return when

    @staticmethod
    def _renewing(session: VoiceSession) -> bool:
        return session.exhausted is DenyReason.NONE and session.detached_until is None

    def _due(self, due: list[Scheduled]) -> None:
        real_now = self.ctx.now()
        now = real_now + _EARLY
        settings = self.ctx.settings
        for session in due:
            assert isinstance(session, VoiceSession)
            if session.busy:
                continue  # what is in flight reschedules the session when it is done
            if session.state is State.SETTLING:
                self._queue_settle(session)  # a settlement the store could not take yet
            elif session.state is State.AUTHORIZED:
                if now >= session.authorized_until:
                    self.expire(session)
                else:
                    self._reschedule(session)
            elif session.state is State.LIVE:
                end = session.grant_end
                if session.detached_until is not None and now >= session.detached_until:
                    self._stop(session, DenyReason.SESSION_ABANDONED, session.elapsed_seconds(real_now))
                elif now >= end:
                    reason = session.exhausted or DenyReason.SERVICE_UNAVAILABLE
                    if session.detached_until is not None:
                        reason = DenyReason.SESSION_ABANDONED
                    self._stop(session, reason, session.granted)
                elif self._renewing(session) and now >= max(end - settings.renewal_lead_seconds, session.retry_at):
                    session.busy = True
                    self._to_renew.append(session)
                    self._flush_soon()
                else:
                    final = not self._renewing(session) or session.retry_at > real_now
                    if final and not session.warned and now >= end - settings.warning_seconds:
                        session.warned = True
                        session.send(WarningMsg(max(0, math.ceil(end - real_now))))
                    self._reschedule(session)

    def _flush_soon(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Hand what came due in this turn of the loop to the store, as one batch each."""
        self._flush_pending = False
        if self._to_renew:
            batch, self._to_renew = self._to_renew, []
            self._spawn(self._renew(batch), "voice-renew")
        if self._to_settle:
            batch, self._to_settle = self._to_settle, []
            self._spawn(self._settle(batch), "voice-settle")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        if self._closed:
            work.close()
            return
        task = self.ctx.clock.spawn(work, name)
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    # -- renewal -----------------------------------------------------------------------

    async def _renew(self, batch: list[VoiceSession]) -> None:
        sessions: list[tuple[VoiceSession, Parties]] = []
        requests: list[ReserveRequest] = []
        for session in batch:
            try:
                prepared = await self._renewal_request(session)
            except Exception as exc:  # the catalog is away, or a bug: try again shortly
                log.warning("renewal of %s failed: %s", session.session_id, exc)
                self._renewed(session, None, DenyReason.SERVICE_UNAVAILABLE)
                continue
            if isinstance(prepared, DenyReason):
                self._renewed(session, None, prepared)
            else:
                sessions.append((session, prepared[1]))
                requests.append(prepared[0])
        if not requests:
            return
        try:
            results = await self.ctx.store.reserve_many(requests)
        except Exception as exc:
            log.warning("renewals failed: %s", exc)
            results = [StoreUnavailable(str(exc))] * len(requests)
        for (session, party), request, result in zip(sessions, requests, results, strict=True):
            if isinstance(result, SessionTakenOver):
                session.busy = False
                self._taken_over(session, request.epoch)
            elif isinstance(result, Exception):
                log.warning("renewal of %s failed: %s", session.session_id, result)
                self._renewed(session, None, DenyReason.SERVICE_UNAVAILABLE)
            elif result.granted_seconds < request.want_seconds:
                self._renewed(session, result, party.deny_reason(result.limited_by) or DenyReason.SERVICE_UNAVAILABLE)
            else:
                self._renewed(session, result, None)

    async def _renewal_request(self, session: VoiceSession) -> tuple[ReserveRequest, Parties] | DenyReason:
        ctx = self.ctx
        if not ctx.status.can_renew():
            return DenyReason.SERVICE_UNAVAILABLE
        party = await parties(ctx, session.client_id)
        if not party.subscription_active(session.direction):
            return DenyReason.SUBSCRIPTION_INACTIVE
        for account_id, rate in party.voice_rates(session.provider).items():
            session.tariffs[account_id].price_from(session.granted, rate)
        now = ctx.now()
        settings = ctx.settings
        request = ReserveRequest(
            session_id=session.session_id,
            agency_id=session.agency_id,
            balance_type=BalanceType.VOICE,
            want_seconds=settings.slice_seconds,
            payers=tuple(Payer(a, t.terms(session.granted)) for a, t in session.tariffs.items()),
            now=now,
            lease_until=now + 2 * settings.slice_seconds + settings.grace_seconds,
            epoch=session.epoch,
        )
        return request, party

    def _renewed(self, session: VoiceSession, result: ReserveResult | None, exhausted: DenyReason | None) -> None:
        session.busy = False
        if result is not None and result.granted_seconds > 0:
            session.granted = result.total_granted_seconds
            session.warned = False
            session.send(session.grant())
            self._balance_changed(session)
        if exhausted is DenyReason.SERVICE_UNAVAILABLE:
            # Not final: ask again a little later, while the grant lasts.
            session.retry_at = self.ctx.now() + RETRY_SECONDS
        else:
            session.retry_at = 0.0
            if exhausted is not None:
                session.exhausted = exhausted
        self._after_operation(session)

    # -- settlement --------------------------------------------------------------------

    def _stop(self, session: VoiceSession, reason: DenyReason, seconds: int) -> None:
        """Settle the session exactly once: with `reason` NONE on SessionEnd (`seconds` used,
        billed up to the grant), otherwise as a cutoff billing `seconds`."""
        if session.stop_reason is not None:
            return
        session.stop_reason = reason
        session.stop_seconds = seconds
        if reason is not DenyReason.NONE and session.state is State.LIVE:
            # The call stops now; what it bills is decided, its settlement may take longer.
            session.final = CutoffMsg(int(reason), seconds)
            session.send(session.final)
        if not session.busy:
            self._begin_settle(session)

    def _begin_settle(self, session: VoiceSession) -> None:
        session.state = State.SETTLING
        self.scheduler.cancel(session)
        self._queue_settle(session)

    def _queue_settle(self, session: VoiceSession) -> None:
        session.busy = True
        self._to_settle.append(session)
        self._flush_soon()

    async def _settle(self, batch: list[VoiceSession]) -> None:
        now = self.ctx.now()
        requests = []
        for session in batch:
            billed = session.stop_seconds
            if session.stop_reason is DenyReason.NONE:
                billed = min(billed, session.granted)
            requests.append(
                SettleRequest(
                    session_id=session.session_id,
                    agency_id=session.agency_id,
                    billed_seconds=billed,
                    costs={a: t.cost(billed) for a, t in session.tariffs.items()},
                    now=now,
                    cutoff_reason=int(session.stop_reason or DenyReason.NONE),
                    epoch=session.epoch,
                )
            )
        try:
            results = await self.ctx.store.settle_many(requests)
        except Exception as exc:
            log.warning("settlements failed: %s", exc)
            results = [StoreUnavailable(str(exc))] * len(requests)
        lost: list[VoiceSession] = []
        for session, request, result in zip(batch, requests, results, strict=True):
            session.busy = False
            if isinstance(result, SettleResult):
                self._settled(session, result)
            elif isinstance(result, SessionTakenOver):
                self._taken_over(session, request.epoch)
            elif isinstance(result, NotFound):
                lost.append(session)
            else:
                if not isinstance(result, StoreUnavailable):
                    log.error("settling %s failed: %s", session.session_id, result)
                # The reservation stays held; asking again keeps the settlement exactly once.
                self._retry(session)
        if lost:
            await self._settle_lost(lost)

    async def _settle_lost(self, sessions: list[VoiceSession]) -> None:
        """The hot store lost these sessions with everything it held (Redis came back empty).
        The rebuild from the database restores and settles what was durable: once the store
        is whole, a session it still does not know was never recorded, and there is no
        reservation left to release (its usage is within the crash-loss bound)."""
        if await self._store_whole():
            for session in sessions:
                log.warning("session %s was lost with the hot store's data", session.session_id)
                self._settled(session, SettleResult(0, {}, False, int(session.stop_reason or 0)))
            return
        for session in sessions:
            self._retry(session)

    def _retry(self, session: VoiceSession) -> None:
        if not self._closed:
            self.scheduler.schedule(session, self.ctx.now() + RETRY_SECONDS)

    async def _store_whole(self) -> bool:
        try:
            intact = await self.ctx.store.ping() is not False
        except StoreUnavailable:
            return False
        return intact and self.ctx.status.store_ok

    def _settled(self, session: VoiceSession, result: SettleResult) -> None:
        session.state = State.SETTLED
        if session.stop_reason is DenyReason.NONE and not result.cutoff_reason:
            final: Message = SummaryMsg(
                billed_seconds=result.billed_seconds,
                client_charged_micros=result.charged.get(session.client_id, 0),
                agency_charged_micros=result.charged.get(session.agency_id, 0),
            )
        else:
            final = CutoffMsg(result.cutoff_reason or int(session.stop_reason or 0), result.billed_seconds)
        if session.final is None:
            session.send(final)
        session.final = final
        session.stream = None
        self.scheduler.cancel(session)
        self.sessions.pop(session.key, None)
        self._ended.set()
        self._balance_changed(session)

    def _taken_over(self, session: VoiceSession, epoch: int) -> None:
        """A renewal or settlement sent at `epoch` was refused: the session has a newer owner."""
        if session.epoch > epoch:  # this process claimed it again meanwhile: carry on
            self._after_operation(session)
            return
        log.info("session %s is served by another replica now", session.session_id)
        session.send(SessionTakenOver(session.session_id))
        session.state = State.SETTLED
        session.stream = None
        self.scheduler.cancel(session)
        self.sessions.pop(session.key, None)
        self._ended.set()

    def _after_operation(self, session: VoiceSession) -> None:
        if session.stop_reason is not None:
            self._begin_settle(session)
        else:
            self._reschedule(session)

    def _balance_changed(self, session: VoiceSession) -> None:
        for account_id in session.tariffs:
            self.ctx.bus.notify(f"balance:{account_id}")

    # -- shutdown ----------------------------------------------------------------------

    async def wait_until_empty(self, within: float | None) -> None:
        async def empty() -> None:
            while self.sessions:
                self._ended.clear()
                await self._ended.wait()

        try:
            await asyncio.wait_for(empty(), None if within is None else max(0.0, within))
        except TimeoutError:
            return

    async def close(self, within: float = 2.0) -> None:
        """Stop every timer without settling what is still open (the process is going away:
        the lease sweeper or the recovery of another replica settles it); batches already in
        flight get `within` seconds to finish."""
        self._closed = True
        for session in list(self.sessions.values()):
            self.scheduler.cancel(session)
        self.sessions.clear()
        if self._work:
            _, late = await asyncio.wait(set(self._work), timeout=within)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)


def _decreasing(seconds: int, last: int) -> CreditdError:
    return InvalidArgument(
        "seconds_used is cumulative and cannot decrease", "seconds_used", seconds_used=seconds, last=last
    )
