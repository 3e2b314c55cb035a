"""Fixtures for tests that need a real database.

`postgres_url` creates a fresh, uniquely named Postgres database for one test and drops it
afterwards. The server is the one every development and CI machine runs
(127.0.0.1:5432, trust auth); CREDITD_TEST_POSTGRES_ADMIN_URL points it elsewhere.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

ADMIN_URL = os.environ.get("CREDITD_TEST_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A `postgresql+psycopg://` URL of an empty database that exists for this test only."""
    name = f"creditd_test_{uuid.uuid4().hex[:8]}"
    admin = psycopg.conninfo.conninfo_to_dict(ADMIN_URL)
    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = sa.URL.create(
            "postgresql+psycopg",
            username=str(admin.get("user", "postgres")),
            password=str(admin["password"]) if admin.get("password") else None,
            host=str(admin.get("host", "127.0.0.1")),
            port=int(str(admin.get("port") or 5432)),
            database=name,
        )
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
