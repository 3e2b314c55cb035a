"""Stores for crash tests: a database and a key prefix of their own, Redis and Postgres
processes that a test may kill."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from creditd.db.migrate import upgrade
from tests import services
from tests.crash.procs import PostgresCluster, RedisServer

# Short slices so that renewals, leases and the sweeper all happen within seconds.
FAST = {
    "CREDITD_SLICE_SECONDS": "3",
    "CREDITD_RENEWAL_LEAD_SECONDS": "1",
    "CREDITD_WARNING_SECONDS": "1",
    "CREDITD_GRACE_SECONDS": "2",
    "CREDITD_AUTHORIZE_TTL_SECONDS": "5",
    "CREDITD_DRAIN_SECONDS": "1",
    "CREDITD_FLUSH_INTERVAL_SECONDS": "0.2",
}


@dataclass
class Stores:
    database_url: str
    redis_url: str
    prefix: str


@pytest.fixture
def shared_stores(postgres_template: str) -> Iterator[Stores]:
    """A fresh database on the machine's Postgres and a fresh prefix on its Redis."""
    database = services.create_database(postgres_template)
    prefix = services.new_redis_prefix()
    try:
        yield Stores(services.postgres_url(database), services.REDIS_URL, prefix)
    finally:
        services.drop_database(database)
        services.delete_redis_keys(prefix)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def private_postgres_database(private_postgres: PostgresCluster) -> Iterator[str]:
    """A migrated database in the private cluster (the cluster is restarted if a test left it down)."""
    if not private_postgres.running():
        private_postgres.start()
    url = private_postgres.create_database(f"creditd_crash_{uuid.uuid4().hex[:8]}")
    upgrade(url)
    yield url
