"""Initial schema: accounts, plans, API keys, ledger, idempotency keys, events, sessions.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _text(name: str, nullable: bool = False) -> sa.Column[str]:
    return sa.Column(name, sa.String(), nullable=nullable)


def _big(name: str, nullable: bool = False) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger(), nullable=nullable)


def _int(name: str, nullable: bool = False) -> sa.Column[int]:
    return sa.Column(name, sa.Integer(), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "accounts",
        _text("account_id"),
        _int("kind"),
        _text("agency_id"),
        _text("display_name"),
        _text("plan_id"),
        _int("billing_mode"),
        sa.Column("inbound_active", sa.Boolean(), nullable=False),
        sa.Column("outbound_active", sa.Boolean(), nullable=False),
        _int("anchor_day"),
        _big("free_voice_micros"),
        _big("free_sms_micros"),
        sa.Column("platform_rates", sa.JSON(), nullable=True),
        sa.Column("settings", sa.JSON(), nullable=False),
        _big("created_at"),
        sa.PrimaryKeyConstraint("account_id", name="pk_accounts"),
    )
    op.create_index("ix_accounts_agency_id", "accounts", ["agency_id"])

    op.create_table(
        "plans",
        _text("agency_id"),
        _text("plan_id"),
        _big("free_voice_micros"),
        _big("free_sms_micros"),
        sa.Column("rates", sa.JSON(), nullable=False),
        _big("usage_limit_micros"),
        _int("max_concurrent_sessions"),
        sa.PrimaryKeyConstraint("agency_id", "plan_id", name="pk_plans"),
    )

    op.create_table(
        "api_keys",
        _text("key_id"),
        _int("role"),
        _text("account_id"),
        _text("secret_sha256"),
        _text("description"),
        _big("created_at"),
        _big("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("key_id", name="pk_api_keys"),
    )
    op.create_index("ix_api_keys_account_id", "api_keys", ["account_id"])

    op.create_table(
        "ledger_entries",
        sa.Column("seq", SEQ, autoincrement=True, nullable=False),
        _text("entry_id"),
        _text("account_id"),
        _int("balance_type"),
        _int("kind"),
        _int("topup_kind", nullable=True),
        _big("amount_micros"),
        _big("free_micros"),
        _big("purchased_micros"),
        _big("usage_micros"),
        _big("seconds"),
        _big("created_at"),
        _text("session_id"),
        _text("message_id"),
        _text("idempotency_key"),
        _text("external_ref"),
        sa.PrimaryKeyConstraint("seq", name="pk_ledger_entries"),
        sa.UniqueConstraint("entry_id", name="uq_ledger_entries_entry_id"),
    )
    op.create_index("ix_ledger_entries_account_id_seq", "ledger_entries", ["account_id", "seq"])
    op.create_index(
        "ix_ledger_entries_account_id_balance_type_created_at",
        "ledger_entries",
        ["account_id", "balance_type", "created_at"],
    )
    op.create_index("ix_ledger_entries_created_at", "ledger_entries", ["created_at"])

    op.create_table(
        "idempotency_keys",
        _text("idempotency_key"),
        _text("fingerprint"),
        _text("entry_id"),
        _big("created_at"),
        sa.PrimaryKeyConstraint("idempotency_key", name="pk_idempotency_keys"),
    )

    op.create_table(
        "events",
        sa.Column("seq", SEQ, autoincrement=True, nullable=False),
        _text("event_id"),
        _text("account_id"),
        _int("type"),
        _int("balance_type"),
        _big("created_at"),
        _big("amount_micros"),
        _text("idempotency_key"),
        _text("session_id"),
        _int("reason"),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_events"),
        sa.UniqueConstraint("event_id", name="uq_events_event_id"),
    )
    op.create_index("ix_events_account_id_seq", "events", ["account_id", "seq"])
    op.create_index("ix_events_account_id_created_at", "events", ["account_id", "created_at"])

    op.create_table(
        "sessions",
        _text("session_id"),
        _text("client_id"),
        _text("agency_id"),
        _int("channel"),
        _int("direction"),
        _text("provider"),
        _text("status"),
        _big("granted_seconds"),
        _big("billed_seconds"),
        sa.Column("reserved", sa.JSON(), nullable=False),
        sa.Column("charged", sa.JSON(), nullable=False),
        _big("updated_at"),
        _int("cutoff_reason"),
        sa.PrimaryKeyConstraint("session_id", name="pk_sessions"),
    )
    op.create_index("ix_sessions_status", "sessions", ["status"])


def downgrade() -> None:
    for table in (
        "sessions",
        "events",
        "idempotency_keys",
        "ledger_entries",
        "api_keys",
        "plans",
        "accounts",
    ):
        op.drop_table(table)
