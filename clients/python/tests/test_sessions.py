"""VoiceSession and SmsSender against a real server with 2-second slices."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import CREDIT, Setup, unique

from creditd_client import (
    Cutoff,
    Denied,
    Grant,
    LowCreditWarning,
    NotFound,
    SessionClosed,
    SessionSummary,
    SmsResult,
    aio,
)
from tests.conftest import Running

EXHAUSTED = "DENY_REASON_CLIENT_CREDITS_EXHAUSTED"


async def test_a_call_runs_until_cutoff_with_callbacks_and_async_iteration(
    client: aio.Client, setup: Setup, fast_server: Running
) -> None:
    await client.topup(setup.client_id, 3 * CREDIT, unique("pay"))  # 3 seconds at one credit a second
    call_id = unique("call")
    seen: list[object] = []
    reported_at_warning: list[int] = []

    async def on_warning(warning: LowCreditWarning) -> None:  # callbacks may be async...
        seen.append(warning)
        reported_at_warning.append(fast_server.app.metering.runs[(setup.agency_id, call_id)].last_reported)

    session = await client.voice_session(
        call_id,
        setup.client_id,
        provider="elevenlabs",
        report_interval=0.5,
        on_grant=seen.append,  # ...or plain functions
        on_warning=on_warning,
        on_cutoff=seen.append,
    )
    assert session.authorization.allowed and session.authorization.granted_seconds == 2
    started = time.monotonic()
    first = await session.answer()
    assert first.granted_seconds == 2

    events = [event async for event in session]
    elapsed = time.monotonic() - started

    assert [type(e) for e in events] == [Grant, Grant, LowCreditWarning, Cutoff]
    assert [e.granted_seconds for e in events if isinstance(e, Grant)] == [2, 3]
    assert events[-1] == Cutoff(EXHAUSTED, 3)
    assert session.cutoff == Cutoff(EXHAUSTED, 3) and session.ended
    assert seen == events  # the same events, in the same order, by callback
    assert 2.5 < elapsed < 4.5
    assert reported_at_warning and reported_at_warning[0] >= 1  # the session reported on its own timer
    assert session.reported_seconds >= 2
    assert await session.hang_up() == Cutoff(EXHAUSTED, 3)  # hanging up after a cutoff changes nothing
    assert [e async for e in session] == []  # iteration has ended for good
    balance = await client.get_balance(setup.client_id)
    assert balance.voice.available_micros == 0 and balance.voice.period_used_micros == 3 * CREDIT


async def test_hang_up_returns_the_summary_and_ends_iteration(client: aio.Client, setup: Setup) -> None:
    await client.topup(setup.client_id, 60 * CREDIT, unique("pay"))
    async with await client.voice_session(unique("call"), setup.client_id) as session:
        await session.answer()
        await asyncio.sleep(0.3)
        summary = await session.hang_up(seconds_used=1)
    assert summary == SessionSummary(billed_seconds=1, client_charged_micros=CREDIT, agency_charged_micros=16_667)
    assert session.summary == summary and session.cutoff is None
    events = [event async for event in session]
    assert events == [Grant(2, events[0].expires_at), summary]  # type: ignore[union-attr]


async def test_leaving_the_session_block_hangs_up(client: aio.Client, setup: Setup) -> None:
    await client.topup(setup.client_id, 60 * CREDIT, unique("pay"))
    async with await client.voice_session(unique("call"), setup.client_id) as session:
        await session.answer()
        await asyncio.sleep(1.1)
    assert session.summary is not None and session.summary.billed_seconds == 2  # a started second counts
    balance = await client.get_balance(setup.client_id)
    assert balance.voice.reserved_micros == 0 and balance.voice.period_used_micros == 2 * CREDIT


async def test_a_lost_stream_is_resumed_and_the_call_goes_on(
    client: aio.Client, setup: Setup, fast_server: Running
) -> None:
    await client.topup(setup.client_id, 60 * CREDIT, unique("pay"))
    call_id = unique("call")
    session = await client.voice_session(call_id, setup.client_id, report_interval=0.2)
    await session.answer()
    await asyncio.sleep(0.5)
    assert session._stream is not None
    await session._stream.cancel()  # the network drops the stream; the server holds the session
    await asyncio.sleep(0.3)
    assert (setup.agency_id, call_id) in fast_server.app.metering.runs
    grant = await session.resume()
    assert grant.granted_seconds >= 2
    await asyncio.sleep(0.5)
    assert session.reported_seconds >= 1  # reporting goes on on the new stream
    summary = await session.hang_up()
    assert isinstance(summary, SessionSummary) and summary.billed_seconds == 2


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
    for _ in range(50):
        if sender.cutoff is not None:
            break
        await asyncio.sleep(0.02)
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
