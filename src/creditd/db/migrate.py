"""Run the Alembic migrations shipped in creditd/migrations, without an alembic.ini."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.pool import NullPool

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# Migrations run as plain blocking code: each asyncio driver through its blocking twin.
_SYNC_DRIVERS = {"sqlite+aiosqlite": "sqlite", "postgresql+asyncpg": "postgresql+psycopg"}


def sync_url(url: str | sa.URL) -> sa.URL:
    """The URL of the same database through a blocking driver (psycopg 3 is both)."""
    parsed = sa.make_url(url)
    return parsed.set(drivername=_SYNC_DRIVERS.get(parsed.drivername, parsed.drivername))


def alembic_config(url: str) -> Config:
    """An Alembic configuration for the database at `url` (async or sync SQLAlchemy URL)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    # env.py reads the URL from attributes: config options would need '%' escaped.
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema up to `revision`. Blocking: call it via asyncio.to_thread in async code."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def schema_problem(url: str, connect_timeout: int = 5) -> str:
    """Why the database's schema does not fit this release ("" when it does). Blocking;
    raises SQLAlchemy's OperationalError when the database cannot be reached."""
    scripts = ScriptDirectory.from_config(alembic_config(url))
    head = scripts.get_current_head()
    parsed = sync_url(url)
    connect_args = {"connect_timeout": connect_timeout} if parsed.get_backend_name() == "postgresql" else {}
    engine = sa.create_engine(parsed, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
    if current == head:
        return ""
    if current is None:
        return "holds no creditd schema: run `creditd migrate` first"
    known = {script.revision for script in scripts.walk_revisions()}
    if current not in known:
        return f"was migrated by a newer creditd (schema {current}): run that release, or a newer one"
    return f"has an older schema ({current}, this release needs {head}): run `creditd migrate` first"
