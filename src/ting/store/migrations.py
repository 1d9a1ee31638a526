"""Migrations: history, not the current schema. Each one is frozen as it was first released, with its own table
definitions, so that a later change to the tables in db.py never changes what an earlier migration does; a new
column or table is a new migration at the end of the list. `tests/store/test_migrations.py` checks that applying
them all gives the schema db.py describes, on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

Migration = Callable[[sa.Connection], None]  # runs inside the migrating transaction


def v1_initial_schema(conn: sa.Connection) -> None:
    """Keys, reservations, the ledger, rate windows, instances, uploads and server secrets (Ting 0.1)."""
    schema = sa.MetaData()
    sa.Table(
        "api_keys",
        schema,
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, server_default=""),
        sa.Column("prefix", sa.String(24), nullable=False),  # shown in listings: "sk-ting-Ab12"
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),  # SHA-256 of the key; never the key
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float),
        sa.Column("revoked_at", sa.Float),
        sa.Column("quota_tokens", sa.BigInteger),  # tokens granted; NULL: unlimited
        sa.Column("spent_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("reserved_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("rpm", sa.Integer),  # requests per minute; NULL: unlimited
        sa.Column("max_concurrency", sa.Integer),  # requests in flight; NULL: unlimited
        sa.CheckConstraint("spent_tokens >= 0 AND reserved_tokens >= 0", name="ck_balance_non_negative"),
        sa.CheckConstraint(
            "quota_tokens IS NULL OR spent_tokens + reserved_tokens <= quota_tokens", name="ck_within_quota"
        ),
    )

    # One row per request in flight: written when it is admitted, deleted when it is settled.
    sa.Table(
        "reservations",
        schema,
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(40), index=True),  # NULL for static keys and open servers
        sa.Column("tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("model", sa.String(100), nullable=False, server_default=""),
        sa.Column("protocol", sa.String(20), nullable=False, server_default=""),
        sa.Column("instance_id", sa.String(64), nullable=False, index=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )

    # One row per request, written exactly once.
    sa.Table(
        "ledger",
        schema,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(64), nullable=False, unique=True),
        sa.Column("key_id", sa.String(40), index=True),
        sa.Column("model", sa.String(100), nullable=False, server_default=""),
        sa.Column("protocol", sa.String(20), nullable=False, server_default=""),
        sa.Column("status", sa.String(20), nullable=False),  # ok | refused | error | aborted | interrupted
        sa.Column("error_code", sa.String(64)),
        sa.Column("audio_seconds", sa.Float, nullable=False, server_default="0"),
        sa.Column("audio_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("input_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("output_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("charged_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("latency_ms", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float, nullable=False, index=True),
    )

    sa.Table(
        "rate_windows",
        schema,
        sa.Column("key_id", sa.String(40), primary_key=True),
        sa.Column("window_start", sa.BigInteger, primary_key=True),  # epoch minute
        sa.Column("requests", sa.Integer, nullable=False),
    )

    sa.Table(
        "instances",
        schema,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
    )

    sa.Table(
        "uploads",
        schema,
        sa.Column("object_key", sa.String(1024), primary_key=True),
        sa.Column("owner", sa.String(80), nullable=False),
        sa.Column("model", sa.String(100), nullable=False, server_default=""),
        sa.Column("path", sa.String(200), nullable=False),  # file name under the uploads directory
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False, index=True),
    )

    sa.Table(
        "server_secrets",
        schema,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(200), nullable=False),
    )
    schema.create_all(conn)


def v2_upload_data(conn: sa.Connection) -> None:
    """Uploaded bytes in the database, so that replicas sharing PostgreSQL read each other's uploads (Ting 0.2)."""
    schema = sa.MetaData()
    sa.Table(  # the parent, as migration 1 left it, for the foreign key only (not created here)
        "uploads", schema, sa.Column("object_key", sa.String(1024), primary_key=True)
    )
    upload_data = sa.Table(
        "upload_data",
        schema,
        sa.Column(
            "object_key", sa.String(1024), sa.ForeignKey("uploads.object_key", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    schema.create_all(conn, tables=[upload_data])


MIGRATIONS: list[tuple[int, str, Migration]] = [
    (1, "initial schema", v1_initial_schema),
    (2, "upload bytes in the database", v2_upload_data),
]
