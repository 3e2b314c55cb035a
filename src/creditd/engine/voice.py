"""A live voice session: slices reserved ahead of need, a warning, a cutoff on time.

The server's own timer drives it. A slice is renewed `renewal_lead` seconds before the
grant runs out; when nothing more can be reserved the grant in hand is final: the worker
gets a LowCreditWarning `warning_seconds` before its end and a Cutoff at its exact end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable

from creditd.domain.accounts import Direction
from creditd.domain.records import BalanceType, DenyReason
from creditd.domain.tariff import Tariff
from creditd.engine.context import Context
from creditd.engine.messages import CutoffMsg, GrantMsg, Message, SummaryMsg, WarningMsg
from creditd.engine.pricing import parties
from creditd.errors import CreditdError, FailedPrecondition, InvalidArgument, NotFound, StoreUnavailable
from creditd.store.base import Payer, ReserveRequest, SettleRequest, SettleResult

log = logging.getLogger(__name__)
UNAVAILABLE_RETRY_SECONDS = 0.5


class VoiceRun:
    def __init__(
        self,
        ctx: Context,
        session_id: str,
        client_id: str,
        agency_id: str,
        direction: Direction,
        provider: str,
        tariffs: dict[str, Tariff],
        granted: int,
        expires_at: float,
        on_done: Callable[[VoiceRun], None],
    ) -> None:
        self.ctx = ctx
        self.session_id = session_id
        self.client_id = client_id
        self.agency_id = agency_id
        self.direction = direction
        self.provider = provider
        self.tariffs = tariffs
        self.granted = granted
        self.authorize_expires_at = expires_at
        self._on_done = on_done
        self.started: float | None = None  # loop time of SessionStart
        self.exhausted = DenyReason.NONE  # why nothing more can be reserved, for now
        self.warned = False
        self.last_reported = 0
        self.final: Message | None = None
        self._out: asyncio.Queue[Message | CreditdError] | None = None
        self._detached_until: float | None = None
        self._wakeup = asyncio.Event()
        self._stop_lock = asyncio.Lock()
        self._interrupt: tuple[DenyReason, int] | None = None
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name=f"voice:{session_id}")

    @property
    def payer_ids(self) -> list[str]:
        return list(self.tariffs)

    # -- stream side -------------------------------------------------------------------

    def attach(self, out: asyncio.Queue[Message | CreditdError]) -> None:
        """Called on SessionStart: starts the call, or resumes it on a new stream."""
        if self.final is not None:
            out.put_nowait(self.final)
            return
        if self._out is not None and self._out is not out:
            self._out.put_nowait(
                FailedPrecondition("the session was resumed on another stream", "SESSION_RESUMED_ELSEWHERE")
            )
        self._out = out
        self._detached_until = None
        if self.started is None:
            self.started = self._loop.time()
        out.put_nowait(self._grant())
        self._wakeup.set()

    def detach(self, out: asyncio.Queue[Message | CreditdError]) -> None:
        """The stream ended without SessionEnd: hold the session for the grace period."""
        if self._out is out and self.final is None:
            self._out = None
            self._detached_until = self._loop.time() + self.ctx.settings.grace_seconds
            self._wakeup.set()

    def report(self, seconds_used: int) -> None:
        if seconds_used < self.last_reported:
            raise _decreasing(seconds_used, self.last_reported)
        self.last_reported = seconds_used
        if self.exhausted is DenyReason.NONE and seconds_used >= self.granted - self.ctx.settings.renewal_lead_seconds:
            self._wakeup.set()

    async def end(self, seconds_used: int) -> Message:
        if seconds_used < self.last_reported:
            raise _decreasing(seconds_used, self.last_reported)
        return await self._stop(DenyReason.NONE, lambda: min(seconds_used, self.granted))

    def interrupt(self, reason: DenyReason) -> None:
        """Cut the call now (an operator suspended a subscription or lowered a limit)."""
        if self.final is None and self._interrupt is None:
            self._interrupt = (reason, self._elapsed_seconds())
            self._wakeup.set()

    def credit_arrived(self) -> None:
        """A payer was credited: a call living on its final grant may renew again."""
        if self.exhausted in (
            DenyReason.CLIENT_CREDITS_EXHAUSTED,
            DenyReason.AGENCY_CREDITS_EXHAUSTED,
            DenyReason.USAGE_LIMIT_REACHED,
        ):
            self.exhausted = DenyReason.NONE
            self._wakeup.set()

    # -- timer side --------------------------------------------------------------------

    def _elapsed(self) -> float:
        return 0.0 if self.started is None else self._loop.time() - self.started

    def _elapsed_seconds(self) -> int:
        return min(self.granted, math.ceil(self._elapsed()))

    def _grant(self) -> GrantMsg:
        return GrantMsg(self.granted, self.ctx.now() + (self.granted - self._elapsed()))

    def _send(self, message: Message) -> None:
        if self._out is not None:
            self._out.put_nowait(message)

    async def _run(self) -> None:
        settings = self.ctx.settings
        try:
            while self.final is None:
                self._wakeup.clear()
                if self._interrupt is not None:
                    await self._stop(*self._interrupt)
                    return
                if self.started is None:  # authorized, not answered yet
                    wait = self.authorize_expires_at - self.ctx.now()
                    if wait <= 0:
                        await self._stop(DenyReason.SESSION_ABANDONED, 0)
                        return
                    await self._sleep(wait)
                    continue
                now = self._loop.time()
                if self._detached_until is not None and now >= self._detached_until:
                    await self._stop(DenyReason.SESSION_ABANDONED, self._elapsed_seconds())
                    return
                remaining = self.granted - self._elapsed()
                if remaining <= 0:
                    reason = self.exhausted or DenyReason.SERVICE_UNAVAILABLE
                    if self._detached_until is not None:
                        reason = DenyReason.SESSION_ABANDONED
                    await self._stop(reason, self.granted)
                    return
                renewing = self.exhausted is DenyReason.NONE and self._detached_until is None
                if renewing and remaining <= settings.renewal_lead_seconds:
                    await self._renew()
                    continue
                if not renewing and not self.warned and remaining <= settings.warning_seconds:
                    self.warned = True
                    self._send(WarningMsg(math.ceil(remaining)))
                    continue
                wake = remaining
                if renewing:
                    wake = min(wake, remaining - settings.renewal_lead_seconds)
                elif not self.warned:
                    wake = min(wake, remaining - settings.warning_seconds)
                if self.exhausted is DenyReason.SERVICE_UNAVAILABLE:
                    wake = min(wake, UNAVAILABLE_RETRY_SECONDS)
                if self._detached_until is not None:
                    wake = min(wake, self._detached_until - now)
                await self._sleep(wake)
                if self.exhausted is DenyReason.SERVICE_UNAVAILABLE:
                    self.exhausted = DenyReason.NONE
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not leave the session unsettled
            log.exception("voice session %s failed; settling it", self.session_id)
            await self._stop(DenyReason.SERVICE_UNAVAILABLE, self._elapsed_seconds())

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), max(0.0, seconds))
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # Python 3.11's wait_for can swallow a cancel
            raise asyncio.CancelledError

    async def _renew(self) -> None:
        # Under the settlement lock: a SessionEnd arriving meanwhile settles after this
        # renewal, against the grant the worker may already have been sent.
        async with self._stop_lock:
            if self.final is None:
                await self._reserve_more()

    async def _reserve_more(self) -> None:
        if not self.ctx.status.can_renew():
            self.exhausted = DenyReason.SERVICE_UNAVAILABLE
            return
        try:
            party = await parties(self.ctx, self.client_id)
            if not party.subscription_active(self.direction):
                self.exhausted = DenyReason.SUBSCRIPTION_INACTIVE
                return
            for account_id, rate in party.voice_rates(self.provider).items():
                self.tariffs[account_id].price_from(self.granted, rate)
            result = await self.ctx.store.reserve(
                ReserveRequest(
                    session_id=self.session_id,
                    agency_id=self.agency_id,
                    balance_type=BalanceType.VOICE,
                    want_seconds=self.ctx.settings.slice_seconds,
                    payers=tuple(Payer(a, t.terms(self.granted)) for a, t in self.tariffs.items()),
                    now=self.ctx.now(),
                    lease_until=self.ctx.now() + 2 * self.ctx.settings.slice_seconds + self.ctx.settings.grace_seconds,
                )
            )
        except CreditdError as exc:
            log.warning("renewal of %s failed: %s", self.session_id, exc)
            self.exhausted = DenyReason.SERVICE_UNAVAILABLE
            return
        if result.granted_seconds > 0:
            self.granted = result.total_granted_seconds
            self._send(self._grant())
            for account_id in self.tariffs:
                await self.ctx.bus.publish(f"balance:{account_id}")
        if result.granted_seconds < self.ctx.settings.slice_seconds:
            self.exhausted = party.deny_reason(result.limited_by) or DenyReason.SERVICE_UNAVAILABLE

    async def _stop(self, reason: DenyReason, billed: int | Callable[[], int]) -> Message:
        """Settle exactly once and send the final message. `billed` may be computed under the
        settlement lock, so that it sees the last grant."""
        async with self._stop_lock:
            if self.final is None:
                await self._settle(reason, billed() if callable(billed) else billed)
        assert self.final is not None
        current = asyncio.current_task()
        if current is not self._task:
            self._task.cancel()
        return self.final

    async def _settle(self, reason: DenyReason, billed: int) -> None:
        request = SettleRequest(
            session_id=self.session_id,
            agency_id=self.agency_id,
            billed_seconds=billed,
            costs={a: t.cost(billed) for a, t in self.tariffs.items()},
            now=self.ctx.now(),
            cutoff_reason=int(reason),
        )
        announced = False
        while True:
            try:
                result = await self.ctx.store.settle(request)
                break
            except StoreUnavailable:
                if reason is not DenyReason.NONE and not announced:
                    # The call must stop on time even when its settlement has to wait.
                    self._send(CutoffMsg(int(reason), billed))
                    announced = True
                # The reservation stays held; retrying keeps the settlement exactly once.
                await asyncio.sleep(UNAVAILABLE_RETRY_SECONDS)
            except NotFound:
                # The hot store lost the session with everything it held (Redis came back
                # empty). The rebuild from the database restores and settles what was
                # durable: wait until the store is whole, then ask again. A session that the
                # whole store still does not know was never recorded: there is no
                # reservation left to release, and its usage is within the crash-loss bound.
                if await self._store_whole():
                    log.warning("session %s was lost with the hot store's data", self.session_id)
                    result = SettleResult(0, {}, False, int(reason))
                    break
                await asyncio.sleep(UNAVAILABLE_RETRY_SECONDS)
        if reason is DenyReason.NONE:
            final: Message = SummaryMsg(
                billed_seconds=result.billed_seconds,
                client_charged_micros=result.charged.get(self.client_id, 0),
                agency_charged_micros=result.charged.get(self.agency_id, 0),
            )
        else:
            final = CutoffMsg(int(reason), result.billed_seconds)
        self.final = final
        if not announced:
            self._send(final)
        self._out = None
        for account_id in self.tariffs:
            await self.ctx.bus.publish(f"balance:{account_id}")
        if reason is not DenyReason.NONE:
            await self.ctx.bus.publish("events")
        self._on_done(self)

    async def _store_whole(self) -> bool:
        """The hot store answers, holds its data and is not being rebuilt."""
        try:
            intact = await self.ctx.store.ping() is not False
        except StoreUnavailable:
            return False
        return intact and self.ctx.status.store_ok

    async def cancel(self) -> None:
        """Stop the timer without settling (the process is going away; recovery settles)."""
        while not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=1.0)


def _decreasing(seconds: int, last: int) -> CreditdError:
    return InvalidArgument(
        "seconds_used is cumulative and cannot decrease", "seconds_used", seconds_used=seconds, last=last
    )
