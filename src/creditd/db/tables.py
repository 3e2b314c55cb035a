"""The durable schema (SQLAlchemy Core). Migrations in creditd/migrations create exactly this.

Money is BigInteger micro-credits, enums are their int values, timestamps are BigInteger
epoch microseconds. Ledger entries and events carry an autoincrement `seq` that orders
them for paging and watching.
"""

from __future__ import annotations

import sqlalchemy as sa

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

# SQLite only autoincrements an INTEGER PRIMARY KEY.
Seq = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON(none_as_null=True)

accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("account_id", sa.String, primary_key=True),
    sa.Column("kind", sa.Integer, nullable=False),
    sa.Column("agency_id", sa.String, nullable=False, index=True),
    sa.Column("display_name", sa.String, nullable=False),
    sa.Column("plan_id", sa.String, nullable=False),
    sa.Column("billing_mode", sa.Integer, nullable=False),
    sa.Column("inbound_active", sa.Boolean, nullable=False),
    sa.Column("outbound_active", sa.Boolean, nullable=False),
    sa.Column("anchor_day", sa.Integer, nullable=False),
    sa.Column("free_voice_micros", sa.BigInteger, nullable=False),
    sa.Column("free_sms_micros", sa.BigInteger, nullable=False),
    sa.Column("platform_rates", Json, nullable=True),
    sa.Column("settings", Json, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)

plans = sa.Table(
    "plans",
    metadata,
    sa.Column("agency_id", sa.String, primary_key=True),
    sa.Column("plan_id", sa.String, primary_key=True),
    sa.Column("free_voice_micros", sa.BigInteger, nullable=False),
    sa.Column("free_sms_micros", sa.BigInteger, nullable=False),
    sa.Column("rates", Json, nullable=False),
    sa.Column("usage_limit_micros", sa.BigInteger, nullable=False),
    sa.Column("max_concurrent_sessions", sa.Integer, nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String, primary_key=True),
    sa.Column("role", sa.Integer, nullable=False),
    sa.Column("account_id", sa.String, nullable=False, index=True),
    sa.Column("secret_sha256", sa.String, nullable=False),
    sa.Column("description", sa.String, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("revoked_at", sa.BigInteger, nullable=True),
)

ledger_entries = sa.Table(
    "ledger_entries",
    metadata,
    sa.Column("seq", Seq, primary_key=True, autoincrement=True),
    sa.Column("entry_id", sa.String, nullable=False, unique=True),
    sa.Column("account_id", sa.String, nullable=False),
    sa.Column("balance_type", sa.Integer, nullable=False),
    sa.Column("kind", sa.Integer, nullable=False),
    sa.Column("topup_kind", sa.Integer, nullable=True),
    sa.Column("amount_micros", sa.BigInteger, nullable=False),
    sa.Column("free_micros", sa.BigInteger, nullable=False),
    sa.Column("purchased_micros", sa.BigInteger, nullable=False),
    sa.Column("usage_micros", sa.BigInteger, nullable=False),
    sa.Column("seconds", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("session_id", sa.String, nullable=False),
    sa.Column("message_id", sa.String, nullable=False),
    sa.Column("idempotency_key", sa.String, nullable=False),
    sa.Column("external_ref", sa.String, nullable=False),
    # What a usage entry was for (empty on other entries).
    sa.Column("client_id", sa.String, nullable=False, server_default=""),
    sa.Column("provider", sa.String, nullable=False, server_default=""),
    sa.Column("destination_country", sa.String, nullable=False, server_default=""),
    sa.Index(None, "account_id", "seq"),
    sa.Index(None, "account_id", "balance_type", "created_at"),
    sa.Index(None, "created_at"),
)

# The usage entries of the ledger summed per account, balance, UTC day and what they were for,
# kept in the transaction that inserts the entries, so GetUsage reads days, not entries.
# Amounts are what was consumed (positive); charged = free + purchased.
usage_daily = sa.Table(
    "usage_daily",
    metadata,
    sa.Column("account_id", sa.String, primary_key=True),
    sa.Column("balance_type", sa.Integer, primary_key=True),
    sa.Column("day", sa.Integer, primary_key=True),  # days since 1970-01-01 UTC
    sa.Column("client_id", sa.String, primary_key=True),
    sa.Column("provider", sa.String, primary_key=True),
    sa.Column("destination_country", sa.String, primary_key=True),
    sa.Column("voice_seconds", sa.BigInteger, nullable=False),
    sa.Column("sms_segments", sa.BigInteger, nullable=False),
    sa.Column("sms_messages", sa.BigInteger, nullable=False),
    sa.Column("free_micros", sa.BigInteger, nullable=False),
    sa.Column("purchased_micros", sa.BigInteger, nullable=False),
    sa.Column("usage_micros", sa.BigInteger, nullable=False),
)

# Top-up idempotency keys: one row per key of an agency (the agency and its clients share
# them), written in the transaction of its entry.
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("idempotency_key", sa.String, nullable=False),
    sa.Column("fingerprint", sa.String, nullable=False),
    sa.Column("entry_id", sa.String, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("agency_id", sa.String, nullable=False),
    sa.PrimaryKeyConstraint("agency_id", "idempotency_key"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("seq", Seq, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String, nullable=False, unique=True),
    sa.Column("account_id", sa.String, nullable=False),
    sa.Column("type", sa.Integer, nullable=False),
    sa.Column("balance_type", sa.Integer, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("amount_micros", sa.BigInteger, nullable=False),
    sa.Column("idempotency_key", sa.String, nullable=False),
    sa.Column("session_id", sa.String, nullable=False),
    sa.Column("reason", sa.Integer, nullable=False),
    sa.Column("attributes", Json, nullable=False),
    sa.Index(None, "account_id", "seq"),
    sa.Index(None, "account_id", "created_at"),
)

# Session ids are chosen by callers: unique per agency.
sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("session_id", sa.String, nullable=False),
    sa.Column("client_id", sa.String, nullable=False),
    sa.Column("agency_id", sa.String, nullable=False),
    sa.Column("channel", sa.Integer, nullable=False),
    sa.Column("direction", sa.Integer, nullable=False),
    sa.Column("provider", sa.String, nullable=False),
    sa.Column("status", sa.String, nullable=False, index=True),
    sa.Column("granted_seconds", sa.BigInteger, nullable=False),
    sa.Column("billed_seconds", sa.BigInteger, nullable=False),
    sa.Column("reserved", Json, nullable=False),
    sa.Column("charged", Json, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("cutoff_reason", sa.Integer, nullable=False),
    # when the call was answered (0: never): a rebuild after a loss releases a session that
    # was authorized but never answered, and bills an answered one its whole grant
    sa.Column("started_at", sa.BigInteger, nullable=False, server_default="0"),
    sa.PrimaryKeyConstraint("agency_id", "session_id"),
)
