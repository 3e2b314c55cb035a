"""Caller-chosen ids are unique per agency: top-up idempotency keys and voice session ids.

Top-up keys get the agency of the account they credited (rows whose entry is gone keep
an empty agency), and both tables' primary keys become (agency_id, id).

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_AGENCY_OF_KEY = sa.text(
    "UPDATE idempotency_keys SET agency_id = COALESCE(("
    " SELECT accounts.agency_id FROM ledger_entries"
    " JOIN accounts ON accounts.account_id = ledger_entries.account_id"
    " WHERE ledger_entries.entry_id = idempotency_keys.entry_id), '')"
)


def _primary_key(table: str, columns: list[str]) -> None:
    # batch mode: SQLite cannot change a primary key in place, so the table is copied there.
    with op.batch_alter_table(table) as batch:
        batch.drop_constraint(f"pk_{table}", type_="primary")
        batch.create_primary_key(f"pk_{table}", columns)


def upgrade() -> None:
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.add_column(sa.Column("agency_id", sa.String(), nullable=False, server_default=""))
    op.execute(_AGENCY_OF_KEY)
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.alter_column("agency_id", server_default=None)
    _primary_key("idempotency_keys", ["agency_id", "idempotency_key"])
    _primary_key("sessions", ["agency_id", "session_id"])


def downgrade() -> None:
    # Fails where two agencies used the same id: the old schema cannot hold both.
    _primary_key("sessions", ["session_id"])
    _primary_key("idempotency_keys", ["idempotency_key"])
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_column("agency_id")
