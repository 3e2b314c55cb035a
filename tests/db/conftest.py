"""Fixtures for tests that need a real database: a fresh Postgres database per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import services


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A `postgresql+psycopg://` URL of an empty database that exists for this test only."""
    name = services.create_database()
    try:
        yield services.postgres_url(name)
    finally:
        services.drop_database(name)
