"""Authorize, and the usage streams of voice calls and SMS senders."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from creditd.domain.accounts import Channel, Direction, Parties
from creditd.domain.money import MAX_SEGMENTS, MAX_SESSION_SECONDS
from creditd.domain.records import BalanceType, DenyReason, EventRecord, EventType, new_id
from creditd.domain.tariff import Tariff
from creditd.engine import validation
from creditd.engine.clock import Periodic
from creditd.engine.context import Context
from creditd.engine.messages import (
    AuthorizeResult,
    CutoffMsg,
    End,
    Message,
    Request,
    Sms,
    SmsResultMsg,
    Start,
    SummaryMsg,
    Usage,
)
from creditd.engine.pricing import parties
from creditd.engine.voice import Outbox, VoiceEngine, VoiceSession
from creditd.errors import CreditdError, FailedPrecondition, InvalidArgument
from creditd.store.base import (
    Payer,
    ReserveRequest,
    SessionOpen,
    SessionState,
    SessionTakenOver,
    SettleRequest,
    SmsDebitRequest,
)

log = logging.getLogger(__name__)
SWEEP_INTERVAL_SECONDS = 2.0


class Metering:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.voice = VoiceEngine(ctx)
        self.sms_streams: set[UsageStream] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._sweeper: Periodic | None = None

    async def start(self) -> None:
        ready = asyncio.Event()
        self._watcher = asyncio.create_task(self._watch(ready), name="metering-watch")
        self._sweeper = self.ctx.clock.every(SWEEP_INTERVAL_SECONDS, self._sweep_quietly, "metering-sweep")
        await ready.wait()

    async def close(self) -> None:
        if self._sweeper is not None:
            await self._sweeper.stop()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.voice.close()

    # -- Authorize ---------------------------------------------------------------------

    async def authorize(
        self,
        session_id: str,
        client_id: str,
        channel: Channel,
        direction: Direction,
        provider: str,
        country: str,
        quantity: int,
    ) -> AuthorizeResult:
        validation.require_id(client_id, "client_id")
        party = await parties(self.ctx, client_id)
        self.ctx.status.require_serving()
        if channel is Channel.SMS:
            return await self._authorize_sms(party, direction, country, quantity)
        validation.require_text(session_id, "session_id")
        live = self.voice.get(party.agency_id, session_id)
        if live is not None and live.client_id != client_id:
            raise FailedPrecondition(
                "session_id was already used for another session", "SESSION_ID_REUSED", session_id=session_id
            )
        if not party.subscription_active(direction):
            existing = await self.ctx.store.session(party.agency_id, session_id)
            if existing is not None:  # a retry of an authorization given before the change
                return await self._repeat(existing, party, direction, provider)
            return AuthorizeResult(False, DenyReason.SUBSCRIPTION_INACTIVE)
        tariffs = {}
        for account_id, rate in party.voice_rates(provider).items():
            tariff = Tariff()
            tariff.price_from(0, rate)
            tariffs[account_id] = tariff
        expires_at = self.ctx.now() + self.ctx.settings.authorize_ttl_seconds
        result = await self.ctx.store.reserve(
            ReserveRequest(
                session_id=session_id,
                agency_id=party.agency_id,
                balance_type=BalanceType.VOICE,
                want_seconds=self.ctx.settings.slice_seconds,
                payers=tuple(Payer(a, t.terms(0)) for a, t in tariffs.items()),
                now=self.ctx.now(),
                lease_until=expires_at + self._lease_margin(),
                open=SessionOpen(
                    client_id=client_id,
                    channel=int(Channel.VOICE),
                    direction=int(direction),
                    provider=provider,
                    max_concurrent=party.plan.max_concurrent_sessions,
                    authorized_until=expires_at,
                ),
            )
        )
        if result.granted_seconds <= 0 and result.total_granted_seconds > 0:
            # The session exists: a retry (the store reserved nothing more). One round trip
            # serves a new Authorize; only a retry pays for a second one.
            existing = await self.ctx.store.session(party.agency_id, session_id)
            if existing is not None:
                return await self._repeat(existing, party, direction, provider)
        if result.concurrency_denied:
            return AuthorizeResult(False, DenyReason.CONCURRENCY_LIMIT_REACHED)
        if result.granted_seconds <= 0:
            return AuthorizeResult(False, party.deny_reason(result.limited_by))
        self.voice.authorized(
            VoiceSession(
                session_id,
                client_id,
                party.agency_id,
                direction,
                provider,
                tariffs,
                result.total_granted_seconds,
                expires_at,
            )
        )
        for account_id in tariffs:
            self.ctx.bus.notify(f"balance:{account_id}")
        headroom = MAX_SESSION_SECONDS if result.headroom_seconds is None else result.headroom_seconds
        return AuthorizeResult(True, DenyReason.NONE, result.granted_seconds, headroom, expires_at)

    async def _repeat(
        self, existing: SessionState, party: Parties, direction: Direction, provider: str
    ) -> AuthorizeResult:
        """The same session_id again: the same authorization, or an error if it differs."""
        if (existing.client_id, existing.direction, existing.provider, existing.channel) != (
            party.client.account_id,
            int(direction),
            provider,
            int(Channel.VOICE),
        ):
            raise FailedPrecondition(
                "session_id was already used for another session",
                "SESSION_ID_REUSED",
                session_id=existing.session_id,
            )
        if existing.status != "open":
            raise FailedPrecondition(
                "the session is already settled", "SESSION_SETTLED", session_id=existing.session_id
            )
        max_seconds = existing.granted_seconds + await self._headroom_seconds(party, provider)
        return AuthorizeResult(True, DenyReason.NONE, existing.granted_seconds, max_seconds, existing.authorized_until)

    async def _headroom_seconds(self, party: Parties, provider: str) -> int:
        seconds = MAX_SESSION_SECONDS
        for account_id, rate in party.voice_rates(provider).items():
            wallet = await self.ctx.store.read_wallet(party.agency_id, account_id, BalanceType.VOICE, self.ctx.now())
            headroom = wallet.headroom()[0] if wallet else 0
            if headroom is not None and rate > 0:
                seconds = min(seconds, headroom * 60 // rate)
        return seconds

    async def _authorize_sms(
        self, party: Parties, direction: Direction, country: str, quantity: int
    ) -> AuthorizeResult:
        country = validation.country(country, "destination_country")
        if not 1 <= quantity <= MAX_SEGMENTS:
            raise InvalidArgument(f"quantity must be 1-{MAX_SEGMENTS} segments", "quantity")
        if not party.subscription_active(direction):
            return AuthorizeResult(False, DenyReason.SUBSCRIPTION_INACTIVE)
        for account_id, cost in party.sms_costs(country, quantity).items():
            wallet = await self.ctx.store.read_wallet(party.agency_id, account_id, BalanceType.SMS, self.ctx.now())
            if wallet is None:
                continue
            headroom, constraint = wallet.headroom()
            if headroom is not None and constraint is not None and headroom < cost:
                return AuthorizeResult(False, party.deny_reason((account_id, constraint)))
        return AuthorizeResult(True)

    async def drain(self, deadline: float) -> None:
        """Let live calls end by themselves until `deadline` (loop time), then cut them."""
        await self.voice.wait_until_empty(deadline - asyncio.get_running_loop().time())
        for session in list(self.voice.sessions.values()):
            self.voice.interrupt(session, DenyReason.SERVICE_UNAVAILABLE)
        for stream in list(self.sms_streams):
            await stream.cut(DenyReason.SERVICE_UNAVAILABLE)
        await self.voice.wait_until_empty(None)

    def _lease_margin(self) -> float:
        settings = self.ctx.settings
        return settings.slice_seconds + settings.grace_seconds

    # -- reacting to operators and payments --------------------------------------------

    async def _watch(self, ready: asyncio.Event) -> None:
        def wanted(channel: str) -> bool:
            return channel.startswith(("config:", "credit:", "plan:"))

        async with self.ctx.bus.subscribe(wanted) as queue:
            ready.set()
            while True:
                channel = await queue.get()
                try:
                    await self._on_change(channel)
                except Exception:
                    log.exception("reacting to %s failed", channel)

    async def _on_change(self, channel: str) -> None:
        kind, _, account_id = channel.partition(":")
        if kind == "plan":
            agency_id, _, plan_id = account_id.partition(":")
            self.ctx.catalog.forget_plan(agency_id, plan_id)
            return
        voice = self.voice
        if kind == "credit":
            for session in list(voice.sessions.values()):
                if account_id in session.tariffs:
                    voice.credit_arrived(session)
            return
        self.ctx.catalog.forget(account_id)
        for session in [s for s in voice.sessions.values() if account_id in (s.client_id, s.agency_id)]:
            party = await parties(self.ctx, session.client_id)
            if not party.subscription_active(session.direction):
                voice.interrupt(session, DenyReason.SUBSCRIPTION_INACTIVE)
                continue
            wallet = await self.ctx.store.read_wallet(
                session.agency_id, session.client_id, BalanceType.VOICE, self.ctx.now()
            )
            limit_left = wallet.limit_available() if wallet else None
            if limit_left is not None and limit_left < 0:
                voice.interrupt(session, DenyReason.USAGE_LIMIT_REACHED)
            else:
                voice.credit_arrived(session)  # a raised limit or a re-activation may allow renewal again
        for stream in list(self.sms_streams):
            if stream.sms is not None and account_id in (stream.sms.client_id, stream.sms.agency_id):
                party = await parties(self.ctx, stream.sms.client_id)
                if not party.subscription_active(stream.sms.direction):
                    await stream.cut(DenyReason.SUBSCRIPTION_INACTIVE)

    # -- sessions nobody serves ---------------------------------------------------------

    async def sweep(self) -> int:
        """Settle sessions whose lease ran out and that no stream here serves (their replica
        died, or their run failed): an answered call billed everything granted, one never
        answered released (SettleRequest.abandoned). Returns how many."""
        now = self.ctx.now()
        settled = 0
        for agency_id in await self.ctx.catalog.agency_ids():
            mine = {session_id for agency, session_id in self.voice.sessions if agency == agency_id}
            for state in await self.ctx.store.live_sessions(agency_id, skip=mine):
                if state.session_id in mine or state.expires_at >= now or state.channel != Channel.VOICE:
                    continue
                # a replica that claims it meanwhile keeps it (its epoch is then newer)
                request = SettleRequest.abandoned(state, now, epoch=state.epoch)
                try:
                    result = await self.ctx.store.settle(request)
                except SessionTakenOver:
                    continue
                settled += not result.already_settled
        return settled

    async def _sweep_quietly(self) -> None:
        try:
            await self.sweep()
        except CreditdError as exc:  # the store is away: the next sweep tries again
            log.warning("sweeping expired sessions failed: %s", exc)

    def open_stream(self) -> UsageStream:
        return UsageStream(self)


class SmsSession:
    def __init__(self, session_id: str, client_id: str, agency_id: str, direction: Direction) -> None:
        self.session_id = session_id
        self.client_id = client_id
        self.agency_id = agency_id
        self.direction = direction
        self.sent = 0
        self.denied = 0
        self.charged: dict[str, int] = {}
        self.seen: set[str] = set()


class UsageStream:
    """One StreamUsage call: checks the order of requests and carries messages back."""

    __slots__ = ("ctx", "finished", "metering", "out", "sms", "voice")

    def __init__(self, metering: Metering) -> None:
        self.metering = metering
        self.ctx = metering.ctx
        self.out = Outbox()
        self.voice: VoiceSession | None = None
        self.sms: SmsSession | None = None
        self.finished = False  # SessionEnd received, or the session ended

    async def handle(self, request: Request) -> None:
        if self.finished:
            raise FailedPrecondition("the session of this stream has ended", "STREAM_ENDED")
        if isinstance(request, Start):
            await self._start(request)
        elif self.voice is None and self.sms is None:
            raise FailedPrecondition("the first message of a stream must be start", "STREAM_NOT_STARTED")
        elif isinstance(request, Usage):
            if self.voice is None:
                raise InvalidArgument("usage reports belong to voice streams", "usage")
            self.report(request.seconds_used)
        elif isinstance(request, Sms):
            await self._sms(request)
        elif isinstance(request, End):
            await self._end(request)

    def report(self, seconds_used: int) -> None:
        """A usage report of this stream's voice call (cumulative seconds)."""
        if self.finished:
            raise FailedPrecondition("the session of this stream has ended", "STREAM_ENDED")
        assert self.voice is not None
        _require_seconds(seconds_used)
        self.metering.voice.report(self.voice, seconds_used)

    async def _start(self, start: Start) -> None:
        if self.voice is not None or self.sms is not None:
            raise FailedPrecondition("this stream has already started a session", "STREAM_ALREADY_STARTED")
        validation.require_text(start.session_id, "start.session_id")
        validation.require_id(start.client_id, "start.client_id")
        party = await parties(self.ctx, start.client_id)
        if start.channel == Channel.SMS:
            self.ctx.status.require_serving()
            direction = Direction(start.direction) if start.direction else Direction.OUTBOUND
            self.sms = SmsSession(start.session_id, start.client_id, party.agency_id, direction)
            self.metering.sms_streams.add(self)
            if not party.subscription_active(direction):
                await self.cut(DenyReason.SUBSCRIPTION_INACTIVE)
            return
        if start.channel != Channel.VOICE:
            raise InvalidArgument("start.channel must be CHANNEL_VOICE or CHANNEL_SMS", "start.channel")
        voice = self.metering.voice
        local = voice.get(party.agency_id, start.session_id)
        if local is not None and local.client_id != start.client_id:
            raise _not_authorized(start.session_id)
        if local is not None and local.final is not None:  # ended here: say how, again
            self.voice = local
            voice.attach(local, self.out)
            return
        # Claimed on every start, here or on another replica: the call is this replica's now.
        now = self.ctx.now()
        settings = self.ctx.settings
        lease = now + 2 * settings.slice_seconds + settings.grace_seconds
        state = await self.ctx.store.claim(party.agency_id, start.session_id, start.client_id, now, lease)
        if state is None:
            raise _not_authorized(start.session_id)
        if state.status == "settled":
            self._finish(_final_of(state))
            return
        session = voice.adopt(state, party.voice_rates(state.provider))
        self.voice = session
        if state.status == "expired":  # never answered in time: released, the caller is told
            session.stream = self.out
            voice.expire(session)
            return
        voice.attach(session, self.out)

    async def _sms(self, sms: Sms) -> None:
        session = self.sms
        if session is None:
            raise InvalidArgument("SMS belong to SMS streams", "sms")
        validation.require_text(sms.message_id, "sms.message_id")
        country = validation.country(sms.destination_country, "sms.destination_country")
        if not 1 <= sms.segments <= MAX_SEGMENTS:
            raise InvalidArgument(f"sms.segments must be 1-{MAX_SEGMENTS}", "sms.segments")
        party = await parties(self.ctx, session.client_id)
        if not party.subscription_active(session.direction):
            await self.cut(DenyReason.SUBSCRIPTION_INACTIVE, sms.message_id)
            return
        result = await self.ctx.store.debit_sms(
            SmsDebitRequest(
                message_id=sms.message_id,
                session_id=session.session_id,
                agency_id=session.agency_id,
                client_id=session.client_id,
                segments=sms.segments,
                costs=party.sms_costs(country, sms.segments),
                now=self.ctx.now(),
                destination_country=country,
            )
        )
        for account_id in (session.client_id, session.agency_id):
            self.ctx.bus.notify(f"balance:{account_id}")
        if not result.allowed:
            await self.cut(party.deny_reason(result.limited_by), sms.message_id)
            return
        payer = session.client_id if party.client.has_wallet else session.agency_id
        if sms.message_id not in session.seen:
            session.seen.add(sms.message_id)
            if not result.duplicate:
                session.sent += 1
                for account_id, micros in result.charged.items():
                    session.charged[account_id] = session.charged.get(account_id, 0) + micros
        self.out.put(SmsResultMsg(sms.message_id, True, 0, result.charged.get(payer, 0)))

    async def cut(self, reason: DenyReason, message_id: str = "") -> None:
        if self.finished or self.sms is None:
            return
        self.finished = True  # one cut, even if another comes while its event is written
        event = EventRecord(
            event_id=new_id(),
            account_id=self.sms.client_id,
            type=EventType.CUTOFF,
            balance_type=BalanceType.SMS,
            created_at=self.ctx.now(),
            session_id=self.sms.session_id,
            reason=int(reason),
            attributes={"message_id": message_id} if message_id else {},
        )
        # Recorded before the stream learns of the cut: the stream ends (and this task with
        # it) as soon as the Cutoff is sent.
        with contextlib.suppress(CreditdError):  # the stream is cut either way
            await self.ctx.store.append_records(self.sms.agency_id, [event])
        if message_id:
            self.sms.denied += 1
            self.out.put(SmsResultMsg(message_id, False, int(reason), 0))
        self._finish(CutoffMsg(int(reason), 0))

    async def _end(self, end: End) -> None:
        _require_seconds(end.seconds_used)
        if self.voice is not None:
            self.metering.voice.end(self.voice, end.seconds_used)
            self.finished = True
            return
        self._end_sms()

    def _end_sms(self) -> None:
        assert self.sms is not None
        session = self.sms
        self._finish(
            SummaryMsg(
                billed_seconds=0,
                client_charged_micros=session.charged.get(session.client_id, 0),
                agency_charged_micros=session.charged.get(session.agency_id, 0),
                messages_sent=session.sent,
                messages_denied=session.denied,
            )
        )

    def half_closed(self) -> None:
        """The caller closed its side of the stream without SessionEnd. For an SMS sender that
        is a normal end; a voice call stays resumable for the grace period."""
        if self.finished:
            return
        if self.sms is not None:
            self._end_sms()
            return
        started = self.voice is not None
        self.out.put(
            FailedPrecondition(
                "the stream was closed without SessionEnd",
                "STREAM_NOT_ENDED" if started else "STREAM_NOT_STARTED",
            )
        )

    def _finish(self, final: Message) -> None:
        self.finished = True
        self.metering.sms_streams.discard(self)
        self.out.put(final)

    def close(self) -> None:
        """The caller went away: a voice session waits for a resume, an SMS session just ends."""
        self.metering.sms_streams.discard(self)
        if self.voice is not None:
            self.metering.voice.detach(self.voice, self.out)


def _not_authorized(session_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        "call Authorize for this session_id first", "SESSION_NOT_AUTHORIZED", session_id=session_id
    )


def _require_seconds(seconds: int) -> None:
    if not 0 <= seconds <= MAX_SESSION_SECONDS:
        raise InvalidArgument(f"seconds_used must be 0-{MAX_SESSION_SECONDS}", "seconds_used")


def _final_of(state: SessionState) -> Message:
    if state.cutoff_reason:
        return CutoffMsg(state.cutoff_reason, state.billed_seconds)
    return SummaryMsg(
        state.billed_seconds, state.charged.get(state.client_id, 0), state.charged.get(state.agency_id, 0)
    )
