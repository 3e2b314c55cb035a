"""The README's walkthrough script runs against a server as a new user would run it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ADMIN_TOKEN, Running

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "walkthrough.py"


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
async def test_walkthrough_ends_with_the_call_cut_off_when_credits_run_out(server: Running) -> None:
    env = {**os.environ, "CREDITD_ADDRESS": server.app.address, "CREDITD_TOKEN": ADMIN_TOKEN}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    text = output.decode()
    assert process.returncode == 0, text
    assert "authorize: allowed=True granted=12s" in text
    assert "warning: 10s left" in text
    assert "cutoff: DENY_REASON_CLIENT_CREDITS_EXHAUSTED, billed 12s" in text
    assert "0 credits left, 12 used this period" in text


def test_walkthrough_without_a_token_says_what_to_set() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CREDITD_TOKEN"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "set CREDITD_TOKEN to the admin key that `creditd serve` printed" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
