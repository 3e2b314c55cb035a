"""Fixtures for tests that need a real database: a fresh Postgres database per test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from creditd.db import Database
from creditd.db.migrate import upgrade
from tests import services


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A `postgresql+psycopg://` URL of an empty database that exists for this test only."""
    name = services.create_database()
    try:
        yield services.postgres_url(name)
    finally:
        services.drop_database(name)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'creditd.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    await asyncio.to_thread(upgrade, database_url)
    db = Database(database_url)
    try:
        yield db
    finally:
        await db.close()
