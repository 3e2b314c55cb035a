"""How sessions, senders, events and ledger entries look to a caller: `async with` without
`await`, a clear error instead of a wait that never ends, names instead of enum numbers,
segments for SMS, and the same sessions on the blocking client."""

from __future__ import annotations

import asyncio

import pytest
from conftest import ADMIN_TOKEN, CREDIT, Setup, unique

import creditd_client
from creditd_client import Cutoff, Event, Grant, SessionSummary, SmsResult, aio
from creditd_client.v1 import ledger_pb2
from tests.conftest import Running


async def test_an_sms_sender_opens_with_async_with_alone(client: aio.Client, setup: Setup) -> None:
    await client.topup(setup.client_id, CREDIT, unique("pay"), balance_type="sms")
    async with client.sms_sender(setup.client_id) as sender:
        assert await sender.send("m1", "US", segments=2) == SmsResult("m1", True, "", 332_000)
    assert sender.final == SessionSummary(0, 332_000, 332_000, messages_sent=1, messages_denied=0)
    opened = await client.sms_sender(setup.client_id)  # awaiting it opens it too
    assert (await opened.send("m2", "US")).allowed
    await opened.close()


async def test_iterating_a_session_before_answer_is_an_error_not_a_wait(client: aio.Client, setup: Setup) -> None:
    await client.topup(setup.client_id, CREDIT, unique("pay"))
    session = await client.voice_session(unique("call"), setup.client_id)
    with pytest.raises(RuntimeError, match=r"answer\(\) the call before iterating its events"):
        await asyncio.wait_for(anext(session), 5)
    await session.answer()
    assert isinstance(await asyncio.wait_for(anext(session), 5), Grant)
    await session.hang_up(1)


async def test_events_carry_names_not_numbers(client: aio.Client, setup: Setup) -> None:
    await client.topup(setup.client_id, 3 * CREDIT, unique("pay"), balance_type="sms")
    (event,) = [e async for e in client.list_events(setup.client_id)]
    assert isinstance(event, Event)
    assert (event.type, event.balance_type, event.reason) == ("EVENT_TYPE_TOPUP_APPLIED", "BALANCE_TYPE_SMS", "")
    assert event.amount_micros == 3 * CREDIT and event.created_at is not None


async def test_a_ledger_entry_counts_segments_for_sms_and_seconds_for_voice(client: aio.Client, setup: Setup) -> None:
    await client.topup(setup.client_id, CREDIT, unique("pay"), balance_type="sms")
    await client.topup(setup.client_id, CREDIT, unique("pay"))
    async with client.sms_sender(setup.client_id) as sender:
        assert (await sender.send("m1", "GB", segments=3)).allowed
    session = await client.voice_session(unique("call"), setup.client_id)
    async with session:
        await session.answer()
        final = await session.hang_up(seconds_used=2)  # the server bills no more than its clock saw
    entries = [e async for e in client.list_ledger_entries(setup.client_id)]
    (sms,) = [e for e in entries if e.kind == ledger_pb2.LEDGER_ENTRY_KIND_SMS_USAGE]
    (voice,) = [e for e in entries if e.kind == ledger_pb2.LEDGER_ENTRY_KIND_VOICE_USAGE]
    assert (sms.segments, sms.seconds) == (3, 0)
    assert (voice.seconds, voice.segments) == (final.billed_seconds, 0) and voice.seconds > 0


async def test_the_blocking_client_runs_voice_sessions_and_sms_senders(fast_server: Running, setup: Setup) -> None:
    def worker() -> None:
        with creditd_client.Client(fast_server.app.address, ADMIN_TOKEN) as client:
            client.topup(setup.client_id, 3 * CREDIT, unique("pay"))  # 3 s at one credit a second
            client.topup(setup.client_id, CREDIT, unique("pay"), balance_type="sms")
            with client.sms_sender(setup.client_id) as sender:
                assert sender.send("m1", "US") == SmsResult("m1", True, "", 166_000)
            assert sender.final == SessionSummary(0, 166_000, 166_000, messages_sent=1, messages_denied=0)
            warned: list[int] = []
            session = client.voice_session(
                unique("call"), setup.client_id, report_interval=0.5, on_warning=lambda w: warned.append(w)
            )
            with session:
                assert session.answer().granted_seconds == 2
                events = list(session)  # until the server cuts the call off
            assert events[-1] == Cutoff("DENY_REASON_CLIENT_CREDITS_EXHAUSTED", 3)
            assert session.cutoff == events[-1] and warned

    await asyncio.wait_for(asyncio.to_thread(worker), 30)
