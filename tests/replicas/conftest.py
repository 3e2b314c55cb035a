"""Replicas share one Redis key prefix and one Postgres database: only that backend here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import services


@pytest.fixture
def backend(postgres_template: str) -> Iterator[dict[str, str]]:
    """Overrides the root conftest's `backend`: make_server starts replicas of one deployment."""
    with services.redis_and_postgres(postgres_template) as settings:
        yield settings
