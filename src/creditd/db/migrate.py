"""Run the Alembic migrations shipped in creditd/migrations, without an alembic.ini.

Alembic (with Mako and Pygments, 11 MB of a server's memory) is imported only to migrate or
to explain a schema that does not fit: a server whose schema is current reads its revision
with one query and compares it with HEAD_REVISION."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# The newest migration of this release (tests/db check that it is Alembic's head).
HEAD_REVISION = "0004"
# Migrations run as plain blocking code: each asyncio driver through its blocking twin.
_SYNC_DRIVERS = {"sqlite+aiosqlite": "sqlite", "postgresql+asyncpg": "postgresql+psycopg"}


def sync_url(url: str | sa.URL) -> sa.URL:
    """The URL of the same database through a blocking driver (psycopg 3 is both)."""
    parsed = sa.make_url(url)
    return parsed.set(drivername=_SYNC_DRIVERS.get(parsed.drivername, parsed.drivername))


def alembic_config(url: str) -> Config:
    """An Alembic configuration for the database at `url` (async or sync SQLAlchemy URL)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    # env.py reads the URL from attributes: config options would need '%' escaped.
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema up to `revision`. Blocking: call it via asyncio.to_thread in async code."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def upgrade_if_behind(url: str) -> None:
    """Bring the schema up to this release's, loading Alembic only when there is work."""
    if current_revision(url) != HEAD_REVISION:
        upgrade(url)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def current_revision(url: str, connect_timeout: int = 5) -> str | None:
    """The schema revision the database holds (None: no creditd schema). Blocking; raises
    SQLAlchemy's OperationalError when the database cannot be reached."""
    parsed = sync_url(url)
    connect_args = {"connect_timeout": connect_timeout} if parsed.get_backend_name() == "postgresql" else {}
    engine = sa.create_engine(parsed, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            if not sa.inspect(connection).has_table("alembic_version"):
                return None
            return connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


def schema_problem(url: str, connect_timeout: int = 5) -> str:
    """Why the database's schema does not fit this release ("" when it does). Blocking;
    raises SQLAlchemy's OperationalError when the database cannot be reached."""
    current = current_revision(url, connect_timeout)
    if current == HEAD_REVISION:
        return ""
    if current is None:
        return "holds no creditd schema: run `creditd migrate` first"
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config(url))
    head = scripts.get_current_head()
    known = {script.revision for script in scripts.walk_revisions()}
    if current not in known:
        return f"was migrated by a newer creditd (schema {current}): run that release, or a newer one"
    return f"has an older schema ({current}, this release needs {head}): run `creditd migrate` first"
