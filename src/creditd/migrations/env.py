"""Alembic environment of creditd.

The URL comes from config.attributes["url"] (see creditd.db.migrate) or the sqlalchemy.url
option. Async driver URLs are run through the matching sync driver, so migrations run
as plain blocking code: sqlite+aiosqlite -> sqlite (pysqlite), postgresql+asyncpg ->
postgresql+psycopg (psycopg 3 is both). On Postgres, concurrent migrators serialize on an
advisory lock, so replicas may all run `creditd migrate` at start-up.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context
from sqlalchemy.pool import NullPool

from creditd.db.migrate import sync_url
from creditd.db.tables import metadata

_MIGRATE_LOCK = 0x63726564_6D6967  # "cred" "mig"


def _url() -> sa.URL:
    config = context.config
    raw = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not raw:
        raise RuntimeError("no database URL given to the creditd migrations")
    return sync_url(raw)


def run_offline() -> None:
    url = _url()
    context.configure(
        url=url,
        target_metadata=metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = sa.create_engine(_url(), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=metadata,
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATE_LOCK)))
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
