"""Sessions: when the call was answered.

A rebuild of the hot store (after Redis lost its data, or at the start of a process on
the embedded store) settles every open session. One that was authorized and never
answered is released at 0 s; one that was answered is billed its whole grant. Rows from
before this revision do not say which they were: they are taken as answered, the rule
they were written under.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("sessions", sa.Column("started_at", sa.BigInteger(), nullable=False, server_default="0"))
    op.execute("UPDATE sessions SET started_at = updated_at")


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("started_at")
