"""The durable store (SQLite or Postgres through SQLAlchemy) and its migrations."""

from creditd.db.database import Database

__all__ = ["Database"]
