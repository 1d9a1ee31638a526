"""The database: SQLite in the data directory by default, PostgreSQL for several replicas.

SQLAlchemy Core speaks both; every transaction is one synchronous function (`Database.write`), run on SQLite's
own thread or through asyncpg. SQLite runs in WAL mode with synchronous=FULL (a usage row survives a
crash and a power cut) and takes its write lock at the start of each transaction (BEGIN IMMEDIATE), so a
read-then-write never fails half-way with SQLITE_BUSY; concurrent writers wait up to busy_timeout.
PostgreSQL locks the rows it is about to change (SELECT ... FOR UPDATE). The tables below are the schema the code
expects now; migrations.py is how a database gets there: an ordered list, each applied once and recorded in
schema_migrations.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ting.store.migrations import MIGRATIONS

metadata = sa.MetaData()
MODEL_COLUMN_CHARS = 100

api_keys = sa.Table(
    "api_keys",
    metadata,
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
reservations = sa.Table(
    "reservations",
    metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("key_id", sa.String(40), index=True),  # NULL for static keys and open servers
    sa.Column("tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("model", sa.String(100), nullable=False, server_default=""),
    sa.Column("protocol", sa.String(20), nullable=False, server_default=""),
    sa.Column("instance_id", sa.String(64), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

# One row per request, written exactly once.
ledger = sa.Table(
    "ledger",
    metadata,
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

rate_windows = sa.Table(
    "rate_windows",
    metadata,
    sa.Column("key_id", sa.String(40), primary_key=True),
    sa.Column("window_start", sa.BigInteger, primary_key=True),  # epoch minute
    sa.Column("requests", sa.Integer, nullable=False),
)

instances = sa.Table(
    "instances",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
)

uploads = sa.Table(
    "uploads",
    metadata,
    sa.Column("object_key", sa.String(1024), primary_key=True),
    sa.Column("owner", sa.String(80), nullable=False),
    sa.Column("model", sa.String(100), nullable=False, server_default=""),
    sa.Column("path", sa.String(200), nullable=False),  # file under the uploads directory; "": in upload_data
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
)

# The bytes of an upload kept in the database itself (PostgreSQL: every replica reads them), deleted with its row.
upload_data = sa.Table(
    "upload_data",
    metadata,
    sa.Column("object_key", sa.String(1024), sa.ForeignKey("uploads.object_key", ondelete="CASCADE"), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

server_secrets = sa.Table(
    "server_secrets",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(200), nullable=False),
)

schema_migrations = sa.Table(
    "schema_migrations",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
)


T = TypeVar("T")
Work = Callable[[sa.Connection], T]  # what runs inside one transaction (or one read-only connection)


def async_url(url: str) -> str:
    """PostgreSQL's async driver: postgresql -> asyncpg."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


class Database:
    """Each transaction is one synchronous function of a SQLAlchemy Connection (`write(work)`), run whole:

    * SQLite: on a thread of its own, with the standard library's driver. One writer thread takes the
      transactions in turn, first come first served (SQLite has one writer at a time), and two reader threads the
      reads (WAL: readers never wait for the writer). The event loop hands over each transaction once: an async
      driver crosses threads for every statement, fetch and cursor close (about 48 crossings per chat request; a
      request's authenticate, admit, reserve and settle took 17 ms of CPU and 21 ms of wall time, now 5 and 6).
    * PostgreSQL: asyncpg, the work run by SQLAlchemy's `run_sync` in the event loop.

    A transaction whose caller is cancelled before it started does not run; once started, it runs to its end.
    """

    def __init__(self, url: str) -> None:
        self.dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
        self.url = url.replace("sqlite+aiosqlite:", "sqlite:", 1) if self.dialect == "sqlite" else async_url(url)
        self._aside: AsyncEngine | None = None  # PostgreSQL: one connection of its own, for the heartbeat
        self._sqlite: sa.Engine | None = None
        self._async: AsyncEngine | None = None
        if self.dialect == "sqlite":
            path = sa.engine.make_url(self.url).database
            if path and path != ":memory:":
                private_file(Path(path))
            self._sqlite = sa.create_engine(self.url, pool_size=3, max_overflow=0)
            _sqlite_pragmas(self._sqlite)
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="ting-db-write")
            self._readers = ThreadPoolExecutor(2, thread_name_prefix="ting-db-read")
        else:
            self._async = create_async_engine(self.url, pool_size=10, max_overflow=20, pool_pre_ping=True)

    @property
    def async_engine(self) -> AsyncEngine:
        """PostgreSQL's engine (tests hold its connections)."""
        assert self._async is not None, "SQLite has no async engine"
        return self._async

    @property
    def for_update(self) -> bool:
        """Whether SELECT ... FOR UPDATE means anything (SQLite already holds the write lock)."""
        return self.dialect == "postgresql"

    async def migrate(self) -> list[str]:
        """Apply pending migrations; returns their names. Safe to run from several replicas at once."""

        def work(conn: sa.Connection) -> list[str]:
            applied: list[str] = []
            if self.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(727175)"))  # one migrator at a time
            metadata.create_all(conn, tables=[schema_migrations])
            done = {row.version for row in conn.execute(sa.select(schema_migrations.c.version))}
            for version, name, migration in MIGRATIONS:
                if version not in done:
                    migration(conn)
                    conn.execute(schema_migrations.insert().values(version=version, name=name, applied_at=time.time()))
                    applied.append(name)
            return applied

        return await self.write(work)

    async def write(self, work: Work[T]) -> T:
        """Run `work` in one transaction that may write (SQLite: BEGIN IMMEDIATE); commit, or roll back if it
        raises."""
        if self._sqlite is not None:
            return await self._on(self._writer, _transaction, self._sqlite, work)
        async with self.async_engine.begin() as conn:
            return await conn.run_sync(work)

    async def write_aside(self, work: Work[T]) -> T:
        """A short write transaction that never queues behind the requests' transactions for a connection.

        PostgreSQL: a connection of its own. Under load every pooled connection can be waiting on a busy key's
        row; a heartbeat queued behind them would make its replica look dead to the others, which would then
        release requests it is still serving. SQLite: an ordinary write (one server; nobody judges its heartbeat).
        """
        if self._sqlite is not None:
            return await self.write(work)
        if self._aside is None:
            self._aside = create_async_engine(self.url, pool_size=1, max_overflow=0, pool_pre_ping=True)
        async with self._aside.begin() as conn:
            return await conn.run_sync(work)

    async def query(self, work: Work[T]) -> T:
        """Run `work` on a connection that only reads (several statements, one round trip)."""
        if self._sqlite is not None:
            return await self._on(self._readers, _reading, self._sqlite, work)
        async with self.async_engine.connect() as conn:
            return await conn.run_sync(work)

    async def read(self, statement: Any) -> list[Any]:
        """The rows of one SELECT."""
        return await self.query(lambda conn: list(conn.execute(statement)))

    @staticmethod
    async def _on(
        threads: ThreadPoolExecutor, run: Callable[[sa.Engine, Work[T]], T], engine: sa.Engine, work: Work[T]
    ) -> T:
        return await asyncio.get_running_loop().run_in_executor(threads, run, engine, work)

    async def close(self) -> None:
        if self._sqlite is not None:
            for threads in (self._writer, self._readers):
                await asyncio.to_thread(threads.shutdown)
            self._sqlite.dispose()
        if self._async is not None:
            await self._async.dispose()
        if self._aside is not None:
            await self._aside.dispose()


def _transaction(engine: sa.Engine, work: Work[T]) -> T:
    with engine.begin() as conn:
        return work(conn)


def _reading(engine: sa.Engine, work: Work[T]) -> T:
    with engine.connect() as conn:
        conn.execution_options(ting_read_only=True)  # a deferred BEGIN: WAL readers take no lock (_sqlite_pragmas)
        return work(conn)


def bounded(text: str, max_chars: int) -> str:
    """A string any database column of `max_chars` holds: no NUL or other control characters, no lone
    surrogates, at most `max_chars` characters. (The API refuses such names first; this is the last line.)"""
    clean = "".join(c if c.isprintable() and not "\ud800" <= c <= "\udfff" else "?" for c in text[:max_chars])
    return clean


def private_dir(path: Path) -> None:
    """Create `path` and any missing parents with mode 0700 (an existing directory is left as it is)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)


def private_file(path: Path) -> None:
    """Create `path` (and its directory) readable by this user only: 0600 in a 0700 directory it creates.

    The database holds the upload-policy secret and the whole ledger. SQLite gives its -wal and -shm files the
    database file's mode, so they are private too. An existing file is tightened to 0600.
    """
    private_dir(path.parent)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)


def _sqlite_pragmas(engine: sa.Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # let the "begin" hook below issue BEGIN
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=10000", "foreign_keys=ON"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("ting_read_only") else "BEGIN IMMEDIATE")
