"""Usage: what each usage entry was for, and the daily usage rollup that GetUsage reads.

Entries written before this revision get their client and provider from their session
where the session is known (an SMS entry's country was not recorded); the rollup is filled
from the ledger as it is, so its sums equal the ledger's from the start.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_DIMENSIONS = ("client_id", "provider", "destination_country")
_DAY_MICROS = 86_400 * 1_000_000


def upgrade() -> None:
    for name in _DIMENSIONS:
        op.add_column("ledger_entries", sa.Column(name, sa.String(), nullable=False, server_default=""))
    op.create_table(
        "usage_daily",
        sa.Column("account_id", sa.String(), nullable=False),
        sa.Column("balance_type", sa.Integer(), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("client_id", sa.String(), nullable=False),
        sa.Column("provider", sa.String(), nullable=False),
        sa.Column("destination_country", sa.String(), nullable=False),
        sa.Column("voice_seconds", sa.BigInteger(), nullable=False),
        sa.Column("sms_segments", sa.BigInteger(), nullable=False),
        sa.Column("sms_messages", sa.BigInteger(), nullable=False),
        sa.Column("free_micros", sa.BigInteger(), nullable=False),
        sa.Column("purchased_micros", sa.BigInteger(), nullable=False),
        sa.Column("usage_micros", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "account_id",
            "balance_type",
            "day",
            "client_id",
            "provider",
            "destination_country",
            name="pk_usage_daily",
        ),
    )
    # Usage entries are VOICE_USAGE (2) and SMS_USAGE (3); an SMS entry's seconds are segments.
    op.execute(
        """
        UPDATE ledger_entries SET
          client_id = (SELECT s.client_id FROM sessions s WHERE s.session_id = ledger_entries.session_id
            AND ledger_entries.account_id IN (s.client_id, s.agency_id)),
          provider = (SELECT s.provider FROM sessions s WHERE s.session_id = ledger_entries.session_id
            AND ledger_entries.account_id IN (s.client_id, s.agency_id))
        WHERE kind IN (2, 3)
          AND EXISTS (SELECT 1 FROM sessions s WHERE s.session_id = ledger_entries.session_id
            AND ledger_entries.account_id IN (s.client_id, s.agency_id))
        """
    )
    op.execute(
        f"""
        INSERT INTO usage_daily
        SELECT account_id, balance_type, CAST(created_at / {_DAY_MICROS} AS INTEGER),
               client_id, provider, destination_country,
               SUM(CASE WHEN kind = 2 THEN seconds ELSE 0 END),
               SUM(CASE WHEN kind = 3 THEN seconds ELSE 0 END),
               SUM(CASE WHEN kind = 3 THEN 1 ELSE 0 END),
               -SUM(free_micros), -SUM(purchased_micros), SUM(usage_micros)
        FROM ledger_entries
        WHERE kind IN (2, 3)
        GROUP BY account_id, balance_type, CAST(created_at / {_DAY_MICROS} AS INTEGER),
                 client_id, provider, destination_country
        """
    )


def downgrade() -> None:
    op.drop_table("usage_daily")
    with op.batch_alter_table("ledger_entries") as batch:
        for name in _DIMENSIONS:
            batch.drop_column(name)
