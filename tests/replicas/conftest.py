"""Replicas share one Redis key prefix and one Postgres database: only that backend here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import services


@pytest.fixture
def backend(postgres_template: str) -> Iterator[dict[str, str]]:
    """Overrides the root conftest's `backend`: make_server starts replicas of one deployment."""
    database = services.create_database(postgres_template)
    prefix = services.new_redis_prefix()
    try:
        yield {
            "database_url": services.postgres_url(database),
            "redis_url": services.REDIS_URL,
            "redis_prefix": prefix,
        }
    finally:
        services.drop_database(database)
        services.delete_redis_keys(prefix)
