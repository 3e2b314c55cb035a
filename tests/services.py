"""The real PostgreSQL and Redis of the development machine (SPEC §9), isolated per test.

Each test gets its own Postgres database (cloned from a migrated template, which is fast)
and its own Redis key prefix, and both are removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import psycopg
import redis
import sqlalchemy as sa
from psycopg import sql

from creditd.db.migrate import upgrade

POSTGRES_ADMIN_URL = os.environ.get("CREDITD_TEST_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("CREDITD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def postgres_url(name: str) -> str:
    admin = psycopg.conninfo.conninfo_to_dict(POSTGRES_ADMIN_URL)
    url = sa.URL.create(
        "postgresql+psycopg",
        username=str(admin.get("user", "postgres")),
        password=str(admin["password"]) if admin.get("password") else None,
        host=str(admin.get("host", "127.0.0.1")),
        port=int(str(admin.get("port") or 5432)),
        database=name,
    )
    return url.render_as_string(hide_password=False)


def create_database(template: str | None = None) -> str:
    """Create a uniquely named database (a copy of `template` if given); returns its name."""
    name = f"creditd_test_{uuid.uuid4().hex[:10]}"
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
        conn.execute(statement)
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def migrated_template() -> str:
    name = create_database()
    upgrade(postgres_url(name))
    return name


def new_redis_prefix() -> str:
    return f"creditd-test-{uuid.uuid4().hex[:10]}:"


def delete_redis_keys(prefix: str, url: str = REDIS_URL, cluster: bool = False) -> None:
    client = redis.RedisCluster.from_url(url) if cluster else redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))  # on a cluster: every primary
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])  # a cluster client splits it by slot
    finally:
        client.close()


@contextlib.contextmanager
def redis_and_postgres(template: str, redis_url: str = REDIS_URL, cluster: bool = False) -> Iterator[dict[str, str]]:
    """Server settings for a database cloned from `template` and a fresh Redis key prefix
    (on the machine's Redis, or the Redis Cluster at `redis_url`), both removed afterwards."""
    database = create_database(template)
    prefix = new_redis_prefix()
    try:
        yield {"database_url": postgres_url(database), "redis_url": redis_url, "redis_prefix": prefix}
    finally:
        drop_database(database)
        delete_redis_keys(prefix, redis_url, cluster)
