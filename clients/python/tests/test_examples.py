"""The example programs run against a server as a worker developer would run them."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from conftest import ADMIN_TOKEN

from tests.conftest import Running

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


async def run_example(name: str, server: Running) -> str:
    env = {**os.environ, "CREDITD_ADDRESS": server.app.address, "CREDITD_TOKEN": ADMIN_TOKEN}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / name), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    text = output.decode()
    assert process.returncode == 0, text
    return text


async def test_voice_worker_talks_until_the_cutoff(server: Running) -> None:
    text = await run_example("voice_worker.py", server)
    assert "authorized: 5s granted" in text
    assert "grant: may talk until second 5" in text
    assert "agent: time to say goodbye (5s left)" in text and "warning: 5s left" in text
    assert "cutoff: DENY_REASON_CLIENT_CREDITS_EXHAUSTED, billed 5s; hanging up" in text
    assert "0 credits left, 5 used this period" in text
    assert "next call refused: DENY_REASON_CLIENT_CREDITS_EXHAUSTED" in text


async def test_sms_sender_sends_until_denied(server: Running) -> None:
    text = await run_example("sms_sender.py", server)
    lines = [line for line in text.splitlines() if line.startswith("message")]
    assert lines == [
        "message 1 to US: sent, 0.166 credits",
        "message 2 to GB: sent, 0.4 credits",
        "message 3 to US: sent, 0.332 credits",
        "message 4 to GB: denied, DENY_REASON_CLIENT_CREDITS_EXHAUSTED",
        "message 5 to US: not sent, the sender is closed (DENY_REASON_CLIENT_CREDITS_EXHAUSTED)",
    ]
    assert "sender closed: Cutoff(reason='DENY_REASON_CLIENT_CREDITS_EXHAUSTED', billed_seconds=0)" in text
    assert "0.102 SMS credits left" in text


async def test_pipecat_bot_is_cut_off_with_a_goodbye_and_the_next_call_refused(server: Running) -> None:
    text = await run_example("pipecat_bot.py", server)
    lines = text.splitlines()
    goodbye = next(i for i, line in enumerate(lines) if "bot: I'm sorry, we're out of time. Goodbye!" in line)
    ended = next(i for i, line in enumerate(lines) if "call ended (CancelFrame)" in line)
    assert goodbye < ended
    assert "first call: Cutoff(reason='DENY_REASON_CLIENT_CREDITS_EXHAUSTED', billed_seconds=6)" in text
    assert "0 credits left" in text
    assert "bot: This line can't take calls right now. Goodbye." in text
    assert "second call refused: DENY_REASON_CLIENT_CREDITS_EXHAUSTED" in text
