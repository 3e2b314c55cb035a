"""VoiceSession and SmsSender against a real server with 2-second slices.

The voice tests run the server on a ManualClock (the `manual_*` fixtures): a test moves the
server's time itself and sees each renewal, warning and cutoff at the exact second it is
due, however busy the machine is. A session made by `_voice_session` reads its elapsed time
(what it reports, and bills on hang-up) from that same clock; its report timer, and the
messages on its stream, take real time, so a test polls for them (`until`, generous
deadlines). One test runs the whole call on the real clock, server and client, to show
that the real timers are wired.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from conftest import ADMIN_TOKEN, CREDIT, FAST, Setup, new_setup, unique
from creditd.engine.clock import ManualClock
from tests.calls import WAIT_SECONDS, until

from creditd_client import (
    Cutoff,
    Denied,
    Grant,
    LowCreditWarning,
    NotFound,
    SessionClosed,
    SessionSummary,
    SmsResult,
    VoiceSession,
    aio,
)
from creditd_client.types import SessionEvent
from tests.conftest import Running, ServerFactory

EXHAUSTED = "DENY_REASON_CLIENT_CREDITS_EXHAUSTED"


async def _voice_session(
    client: aio.Client, client_id: str, clock: ManualClock, session_id: str, **options: Any
) -> VoiceSession:
    """What `client.voice_session` makes (Authorize, then the session), but with the session's
    clock being the server's ManualClock."""
    provider = options.pop("provider", "")
    authorization = await client.authorize(session_id, client_id, provider=provider)
    assert authorization.allowed, authorization
    return VoiceSession(client, session_id, client_id, authorization, clock=clock.now, **options)


async def _events(session: VoiceSession) -> list[SessionEvent]:
    return [event async for event in session]


async def test_a_call_runs_until_cutoff_with_callbacks_and_async_iteration(
    manual_client: aio.Client, manual_setup: Setup, manual_server: Running, clock: ManualClock
) -> None:
    client, setup = manual_client, manual_setup
    await client.topup(setup.client_id, 3 * CREDIT, unique("pay"))  # 3 seconds at one credit a second
    call_id = unique("call")
    seen: list[object] = []
    reported_at_warning: list[int] = []

    async def on_warning(warning: LowCreditWarning) -> None:  # callbacks may be async...
        seen.append(warning)
        live = manual_server.app.metering.voice.get(setup.agency_id, call_id)
        assert live is not None
        reported_at_warning.append(live.last_reported)

    session = await _voice_session(
        client,
        setup.client_id,
        clock,
        call_id,
        provider="elevenlabs",
        report_interval=0.05,
        on_grant=seen.append,  # ...or plain functions
        on_warning=on_warning,
        on_cutoff=seen.append,
    )
    assert session.authorization.allowed and session.authorization.granted_seconds == 2
    first = await session.answer()
    assert first.granted_seconds == 2
    iterated = asyncio.ensure_future(_events(session))
    live = manual_server.app.metering.voice.get(setup.agency_id, call_id)
    assert live is not None

    await clock.advance(0.75)
    assert live.granted == 2
    await clock.advance(0.25)  # 1 s before the end of the grant: renewed, with the last second c1 can pay
    await until(lambda: len(seen) == 2, "the renewal reached the session")
    await until(lambda: live.last_reported == 1, "the session reported on its own timer")
    await clock.advance(0.75)
    assert not live.warned
    await clock.advance(0.25)  # 1 s before the end of the final grant
    await until(lambda: len(seen) == 3, "the warning reached the session")
    await until(lambda: live.last_reported == 2, "the session reported again")
    await clock.advance(0.75)
    assert live.final is None
    await clock.advance(0.25)  # the final grant ends: cut now
    events = await asyncio.wait_for(iterated, WAIT_SECONDS)

    assert [type(e) for e in events] == [Grant, Grant, LowCreditWarning, Cutoff]
    assert [e.granted_seconds for e in events if isinstance(e, Grant)] == [2, 3]
    assert events[2] == LowCreditWarning(1)
    assert events[-1] == Cutoff(EXHAUSTED, 3)
    assert session.cutoff == Cutoff(EXHAUSTED, 3) and session.ended
    assert seen == events  # the same events, in the same order, by callback
    assert reported_at_warning and reported_at_warning[0] >= 1  # the session reported on its own timer
    assert session.reported_seconds >= 2
    assert await session.hang_up() == Cutoff(EXHAUSTED, 3)  # hanging up after a cutoff changes nothing
    assert [e async for e in session] == []  # iteration has ended for good
    balance = await client.get_balance(setup.client_id)
    assert balance.voice.available_micros == 0 and balance.voice.period_used_micros == 3 * CREDIT


async def test_on_the_real_clock_a_call_is_renewed_warned_and_cut_on_time(
    client: aio.Client, setup: Setup, fast_server: Running
) -> None:
    # Server and session on the real clock (`fast_server`, the session's default clock and
    # report timer): this test shows the real timers are wired. It checks only what no busy
    # machine can change: the order of events, and that the cutoff never comes early.
    await client.topup(setup.client_id, 3 * CREDIT, unique("pay"))
    session = await client.voice_session(unique("call"), setup.client_id, report_interval=0.5)
    started = time.monotonic()
    assert (await session.answer()).granted_seconds == 2
    events = await asyncio.wait_for(_events(session), WAIT_SECONDS)
    elapsed = time.monotonic() - started
    assert [type(e) for e in events] == [Grant, Grant, LowCreditWarning, Cutoff]
    assert [e.granted_seconds for e in events if isinstance(e, Grant)] == [2, 3]
    assert events[-1] == Cutoff(EXHAUSTED, 3)
    assert elapsed >= 2.9, f"cut {elapsed:.3f}s after the answer, before the grant ended at 3 s"
    assert session.reported_seconds >= 1  # reported on its own timer, seconds on its own clock
    balance = await client.get_balance(setup.client_id)
    assert (balance.voice.available_micros, balance.voice.reserved_micros) == (0, 0)
    assert balance.voice.period_used_micros == 3 * CREDIT


async def test_hang_up_returns_the_summary_and_ends_iteration(
    manual_client: aio.Client, manual_setup: Setup, clock: ManualClock
) -> None:
    client, setup = manual_client, manual_setup
    await client.topup(setup.client_id, 60 * CREDIT, unique("pay"))
    async with await client.voice_session(unique("call"), setup.client_id) as session:
        await session.answer()
        await clock.advance(0.5)  # before the renewal at 1 s
        summary = await session.hang_up(seconds_used=1)
    assert summary == SessionSummary(billed_seconds=1, client_charged_micros=CREDIT, agency_charged_micros=16_667)
    assert session.summary == summary and session.cutoff is None
    events = [event async for event in session]
    assert events == [Grant(2, events[0].expires_at), summary]  # type: ignore[union-attr]


async def test_leaving_the_session_block_hangs_up(
    manual_client: aio.Client, manual_setup: Setup, clock: ManualClock
) -> None:
    client, setup = manual_client, manual_setup
    await client.topup(setup.client_id, 60 * CREDIT, unique("pay"))
    async with await _voice_session(client, setup.client_id, clock, unique("call")) as session:
        await session.answer()
        await clock.advance(1.25)
    assert session.summary is not None and session.summary.billed_seconds == 2  # a started second counts
    balance = await client.get_balance(setup.client_id)
    assert balance.voice.reserved_micros == 0 and balance.voice.period_used_micros == 2 * CREDIT


async def test_a_lost_stream_is_resumed_and_the_call_goes_on(
    manual_client: aio.Client, manual_setup: Setup, manual_server: Running, clock: ManualClock
) -> None:
    client, setup = manual_client, manual_setup
    await client.topup(setup.client_id, 60 * CREDIT, unique("pay"))
    call_id = unique("call")
    session = await _voice_session(client, setup.client_id, clock, call_id, report_interval=0.05)
    await session.answer()
    await clock.advance(0.5)
    live = manual_server.app.metering.voice.get(setup.agency_id, call_id)
    assert live is not None and session._stream is not None
    await session._stream.cancel()  # the network drops the stream; the server holds the session
    await until(lambda: live.stream is None, "the server noticed the drop")
    await clock.advance(0.25)
    assert manual_server.app.metering.voice.get(setup.agency_id, call_id) is live
    grant = await session.resume()
    assert grant.granted_seconds == 2  # the grant it had: nothing renewed while the stream was away
    await clock.advance(0.5)  # 1.25 s: renewed on the new stream
    await until(lambda: session.granted_seconds == 4, "the renewal reached the resumed session")
    await until(lambda: live.last_reported == 1, "reporting went on on the new stream")
    summary = await session.hang_up()
    assert isinstance(summary, SessionSummary) and summary.billed_seconds == 2


async def test_a_session_closed_without_hanging_up_is_settled_when_the_grace_period_ends(
    make_server: ServerFactory, clock: ManualClock
) -> None:
    async with (
        make_server(clock=clock, **FAST, grace_seconds=0.5) as running,
        aio.Client(running.app.address, ADMIN_TOKEN) as client,
    ):
        setup = await new_setup(client)
        await client.topup(setup.client_id, 60 * CREDIT, unique("pay"))
        call_id = unique("call")
        session = await _voice_session(client, setup.client_id, clock, call_id)
        await session.answer()
        await clock.advance(0.25)
        live = running.app.metering.voice.get(setup.agency_id, call_id)
        assert live is not None
        await session.close()  # the worker goes away without SessionEnd
        await until(lambda: live.stream is None, "the server noticed the stream is gone")
        await clock.advance(0.25)
        assert running.app.metering.voice.get(setup.agency_id, call_id) is live  # still resumable
        await clock.advance(0.25)  # the grace period ends: settled for the second that was used
        assert running.app.metering.voice.get(setup.agency_id, call_id) is None
        balance = await client.get_balance(setup.client_id)
        assert (balance.voice.reserved_micros, balance.voice.period_used_micros) == (0, CREDIT)
        with pytest.raises(SessionClosed) as closed:
            await session.resume()
        assert closed.value.reason == "DENY_REASON_SESSION_ABANDONED"
        assert session.cutoff == Cutoff("DENY_REASON_SESSION_ABANDONED", 1)


async def test_a_call_that_may_not_be_answered_raises_denied(client: aio.Client, setup: Setup) -> None:
    with pytest.raises(Denied) as denied:
        await client.voice_session(unique("call"), setup.client_id)
    assert denied.value.reason == EXHAUSTED
    assert denied.value.authorization.allowed is False


async def test_sms_allowed_then_denied_then_closed(client: aio.Client, setup: Setup) -> None:
    await client.topup(setup.client_id, 500_000, unique("pay"), balance_type="sms")  # 3 US messages
    async with await client.sms_sender(setup.client_id) as sender:
        results = [await sender.send(f"m{n}", "US") for n in range(4)]
        assert results[:3] == [SmsResult(f"m{n}", True, "", 166_000) for n in range(3)]
        assert results[3] == SmsResult("m3", False, EXHAUSTED, 0)
        assert sender.closed
        with pytest.raises(SessionClosed) as closed:
            await sender.send("m4", "US")
        assert closed.value.reason == EXHAUSTED
        assert await sender.close() == Cutoff(EXHAUSTED, 0)
    balance = await client.get_balance(setup.client_id)
    assert balance.sms.available_micros == 500_000 - 3 * 166_000


async def test_sms_close_returns_the_summary_and_a_resend_is_not_charged_twice(
    client: aio.Client, setup: Setup
) -> None:
    await client.topup(setup.client_id, CREDIT, unique("pay"), balance_type="sms")
    sender = await client.sms_sender(setup.client_id)
    assert (await sender.send("hello", "US", segments=2)).charged_micros == 332_000
    assert (await sender.send("hello", "US", segments=2)).allowed  # the same message_id again
    summary = await sender.close()
    assert summary == SessionSummary(0, 332_000, 332_000, messages_sent=1, messages_denied=0)
    with pytest.raises(SessionClosed):
        await sender.send("later", "US")


async def test_a_suspended_subscription_cuts_the_sms_sender(client: aio.Client, setup: Setup) -> None:
    await client.topup(setup.client_id, CREDIT, unique("pay"), balance_type="sms")
    sender = await client.sms_sender(setup.client_id)
    assert (await sender.send("first", "US")).allowed
    await client.update_subscription(setup.client_id, outbound_active=False)
    await until(lambda: sender.cutoff is not None, "the sender heard of the suspension")
    assert sender.cutoff == Cutoff("DENY_REASON_SUBSCRIPTION_INACTIVE", 0)
    with pytest.raises(SessionClosed) as closed:
        await sender.send("second", "US")
    assert closed.value.reason == "DENY_REASON_SUBSCRIPTION_INACTIVE"


async def test_an_sms_sender_for_an_unknown_client_raises_not_found(client: aio.Client) -> None:
    sender = await client.sms_sender("nobody-here")
    with pytest.raises(NotFound) as missing:
        await sender.send("m1", "US")
    assert missing.value.reason == "ACCOUNT_NOT_FOUND"
    with pytest.raises(NotFound):  # the sender stays closed with that error
        await sender.send("m2", "US")
