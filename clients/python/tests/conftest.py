"""Real creditd servers for the client tests, from the server's own test fixtures.

`fast_server` (with `client` and `setup`) runs on the real clock. `manual_server` (with
`manual_client` and `manual_setup`) is the same server on the ManualClock `clock`: a test
moves the server's time with `clock.advance`, as the server's own session tests do.

Run from the repository root: `python -m pytest clients/python/tests`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from creditd.engine.clock import ManualClock

from creditd_client import aio
from tests.conftest import ADMIN_TOKEN, Running, ServerFactory, api, make_server, server

__all__ = ["ADMIN_TOKEN", "FAST", "Setup", "api", "make_server", "server"]

CREDIT = 1_000_000
# Short slices so that calls renew, warn and get cut off within seconds.
FAST = {"slice_seconds": 2, "renewal_lead_seconds": 1, "warning_seconds": 1}


@pytest.fixture
def backend(tmp_path: Path) -> dict[str, str]:
    """The client talks to every backend the same way: its tests use the embedded one."""
    return {"database_url": f"sqlite+aiosqlite:///{tmp_path / 'creditd.db'}"}


@pytest.fixture
async def fast_server(make_server: ServerFactory) -> AsyncIterator[Running]:
    async with make_server(**FAST) as running:
        yield running


@pytest.fixture
async def client(fast_server: Running) -> AsyncIterator[aio.Client]:
    async with aio.Client(fast_server.app.address, ADMIN_TOKEN) as connected:
        yield connected


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def manual_server(make_server: ServerFactory, clock: ManualClock) -> AsyncIterator[Running]:
    """The fast server on a ManualClock: its time moves only by `clock.advance`."""
    async with make_server(clock=clock, **FAST) as running:
        yield running


@pytest.fixture
async def manual_client(manual_server: Running) -> AsyncIterator[aio.Client]:
    async with aio.Client(manual_server.app.address, ADMIN_TOKEN) as connected:
        yield connected


@dataclass
class Setup:
    """An agency with a plan at one credit a second and a REBILLING client on it."""

    agency_id: str
    plan_id: str
    client_id: str


@pytest.fixture
async def setup(client: aio.Client) -> Setup:
    return await new_setup(client)


@pytest.fixture
async def manual_setup(manual_client: aio.Client) -> Setup:
    return await new_setup(manual_client)


async def new_setup(client: aio.Client) -> Setup:
    run = uuid.uuid4().hex[:8]
    result = Setup(f"agency-{run}", "per-second", f"client-{run}")
    await client.create_agency(result.agency_id, "Test agency")
    await client.create_plan(
        result.agency_id,
        result.plan_id,
        default_voice_micros_per_minute=60 * CREDIT,
        default_sms_micros_per_segment=166_000,
    )
    await client.create_client(result.client_id, result.agency_id, result.plan_id)
    return result


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
