"""The write-behind's Postgres path: outbox batches through psycopg, not the ORM.

One transaction per batch, on a connection of its own: each table's rows are COPYed (in
binary) into a temporary staging table, then moved with one INSERT … SELECT … ON CONFLICT
per table. The statements are the ones of creditd.db.outbox (which the SQLite path
executes through SQLAlchemy), compiled once, so both paths follow the same conflict rules.
Per row this costs a COPY row, not a bound statement.

The write-behind fence (a Postgres advisory lock): the write-behind takes records from the
hot store and writes them in one transaction that holds it shared (`fence`); a rebuild of
the hot store holds it exclusively (`exclusive_fence`) while it reads the database and
loads the store. So the rebuild never reads between another replica's take and the commit
of what it took: records taken from a Redis that lost its data just after are in the
database before the rebuild reads it, not committed behind its back (an open session that
nothing settles, usage missing from the rebuilt balances).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import pq
from sqlalchemy.dialects import postgresql

from creditd.db import outbox
from creditd.db import tables as t
from creditd.db.outbox import RecordBatch
from creditd.errors import StoreUnavailable

CONNECT_TIMEOUT_SECONDS = 10
_POSTGRES = sa.make_url("postgresql+psycopg://").get_dialect()()


@dataclass(frozen=True)
class _Stage:
    """A staging table for one table's rows, and the statements that fill and drain it."""

    name: str
    create: str
    copy: str
    insert: str


def _stage(table: sa.Table, columns: Sequence[str], conflict: Callable[[outbox.Insert], sa.ClauseElement]) -> _Stage:
    name = f"creditd_stage_{table.name}"
    names = ", ".join(columns)
    # stage_n keeps outbox order: ledger and event seqs are assigned in it
    stage = sa.table(name, sa.column("stage_n"), *(sa.column(column) for column in columns))
    rows = sa.select(*(stage.c[column] for column in columns)).order_by(stage.c.stage_n)
    insert = conflict(postgresql.insert(table).from_select(list(columns), rows))
    return _Stage(
        name=name,
        create=(
            f"CREATE TEMPORARY TABLE {name} ON COMMIT DELETE ROWS AS "
            f"SELECT 0 AS stage_n, {names} FROM {table.name} WITH NO DATA"
        ),
        copy=f"COPY {name} (stage_n, {names}) FROM STDIN (FORMAT BINARY)",
        insert=str(insert.compile(dialect=_POSTGRES, compile_kwargs={"literal_binds": True})),
    )


_ENTRIES = _stage(
    t.ledger_entries,
    outbox.ENTRY_COLUMNS,
    lambda insert: outbox.entry_insert(insert).returning(t.ledger_entries.c.entry_id),
)
_USAGE_UPSERT = str(
    outbox.usage_upsert(postgresql.insert(t.usage_daily)).compile(
        dialect=_POSTGRES, column_keys=[c.name for c in t.usage_daily.c]
    )
)
_SESSIONS = _stage(t.sessions, outbox.SESSION_COLUMNS, outbox.session_upsert)
_EVENTS = _stage(t.events, outbox.EVENT_COLUMNS, outbox.event_insert)
_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, OSError)
FENCE_LOCK = 0x63726564_7762  # "cred" "wb": the write-behind fence (see the module doc)
# The connection whose transaction holds the fence, in the task that holds it (see `fence`).
_FENCED: contextvars.ContextVar[psycopg.AsyncConnection[Any] | None] = contextvars.ContextVar(
    "creditd_fenced_write", default=None
)


def conninfo(url: str) -> str:
    """The libpq connection string of a SQLAlchemy Postgres URL (any driver)."""
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresWriter:
    """Writes record batches to Postgres, one transaction each; concurrent writes queue."""

    def __init__(self, url: str) -> None:
        self._conninfo = conninfo(url)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._column_types: dict[str, list[int]] = {}  # of each staging table, for binary COPY
        self._lock = asyncio.Lock()

    async def write(self, batch: RecordBatch) -> None:
        """Write a batch in one transaction (inside `fence`: in its transaction).
        StoreUnavailable when Postgres cannot be reached; then nothing of the batch is written."""
        fenced = _FENCED.get()
        if fenced is not None and fenced is self._conn:
            await self._write(fenced, batch)
            return
        async with self._transaction() as conn:
            await self._write(conn, batch)

    @contextlib.asynccontextmanager
    async def fence(self) -> AsyncIterator[None]:
        """A transaction that holds the write-behind fence shared, for the block: what the
        block takes from the hot store and `write`s is committed before a rebuild reads."""
        async with self._transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (FENCE_LOCK,))
            token = _FENCED.set(conn)
            try:
                yield
            finally:
                _FENCED.reset(token)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """The writer's connection, alone, in a transaction; StoreUnavailable when Postgres
        cannot be reached (nothing of the transaction is then written)."""
        async with self._lock:
            try:
                conn = await self._connection()
                async with conn.transaction():
                    yield conn
            except _UNAVAILABLE as exc:
                await self._discard_if_unusable()
                raise StoreUnavailable(f"database unavailable: {exc}") from exc
            except BaseException:
                await self._discard_if_unusable()
                raise

    @contextlib.asynccontextmanager
    async def exclusive_fence(self, wait_seconds: float) -> AsyncIterator[None]:
        """Hold the write-behind fence alone (a rebuild), once the writes in flight of every
        replica have committed; StoreUnavailable if that takes longer than `wait_seconds`."""
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS
            )
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"database unavailable: {exc}") from exc
        try:
            try:
                await conn.execute(f"SET lock_timeout = {int(wait_seconds * 1000)}")
                await conn.execute("SELECT pg_advisory_lock(%s)", (FENCE_LOCK,))
            except psycopg.errors.LockNotAvailable as exc:
                raise StoreUnavailable(
                    f"the write-behind fence was not free within {wait_seconds:g}s; try again", state="rebuilding"
                ) from exc
            except _UNAVAILABLE as exc:
                raise StoreUnavailable(f"database unavailable: {exc}") from exc
            yield  # released with the connection (a rebuilding process that dies frees it too)
        finally:
            await conn.close()

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                await self._conn.close()
                self._conn = None

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None:
            conn = await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS
            )
            try:
                for stage in (_ENTRIES, _SESSIONS, _EVENTS):
                    await conn.execute(stage.create)
                    cursor = await conn.execute(f"SELECT * FROM {stage.name} LIMIT 0")
                    self._column_types[stage.name] = [column.type_code for column in cursor.description or ()]
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        return self._conn

    async def _discard_if_unusable(self) -> None:
        # A broken connection, or one left inside a statement or transaction (an error or a
        # cancellation mid-COPY), is not used again; the next write opens a new one.
        conn = self._conn
        if conn is not None and conn.info.transaction_status != pq.TransactionStatus.IDLE:
            self._conn = None
            await conn.close()

    async def _write(self, conn: psycopg.AsyncConnection[Any], batch: RecordBatch) -> None:
        staged = [
            (_ENTRIES, [outbox.entry_values(e) for e in batch.entries]),
            (_SESSIONS, [outbox.session_values(s) for s in batch.sessions]),
            (_EVENTS, [outbox.event_values(e) for e in batch.events]),
        ]
        async with conn.cursor() as cursor:
            for stage, rows in staged:
                if rows:
                    async with cursor.copy(stage.copy) as copy:
                        copy.set_types(self._column_types[stage.name])
                        for n, values in enumerate(rows):
                            await copy.write_row((n, *values))
            for stage, rows in staged:
                if rows:
                    if stage is _EVENTS:
                        await cursor.execute("SELECT pg_advisory_xact_lock(%s)", (outbox.EVENTS_LOCK,))
                    await cursor.execute(stage.insert)
                    if stage is _ENTRIES:
                        inserted = {row[0] for row in await cursor.fetchall()}
                        usage = outbox.usage_rows(batch.entries, inserted)
                        if usage:
                            await cursor.executemany(_USAGE_UPSERT, usage)
