"""Persistence: API keys, quotas, the usage ledger and uploaded files. The only package that speaks SQL."""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
from pathlib import Path
from typing import IO

import sqlalchemy as sa

from ting.store.db import Database, server_secrets
from ting.store.files import FileStore
from ting.store.keys import KeyInfo, Keys, Principal
from ting.store.ledger import Ledger, UsageSummary
from ting.store.quota import HEARTBEAT_S, STALE_S, Outcome, Quota

__all__ = [
    "HEARTBEAT_S",
    "Database",
    "FileStore",
    "KeyInfo",
    "Keys",
    "Ledger",
    "Outcome",
    "Principal",
    "Quota",
    "Store",
    "UsageSummary",
]

log = logging.getLogger("ting.store")


class DatabaseBusy(RuntimeError):
    pass


class Store:
    def __init__(
        self,
        url: str,
        *,
        home: Path,
        static_keys: tuple[str, ...] = (),
        upload_ttl_s: float = 48 * 3600,
        instance_id: str | None = None,
        instance_timeout_s: float = STALE_S,
    ) -> None:
        self.home = home
        self.db = Database(url)
        self.instance_id = instance_id or f"{os.uname().nodename}-{os.getpid()}-{secrets.token_hex(4)}"
        self.keys = Keys(self.db, static_keys)
        self.quota = Quota(self.db, self.instance_id, stale_s=instance_timeout_s)
        self.ledger = Ledger(self.db)
        self.files = FileStore(self.db, home / "uploads", ttl_s=upload_ttl_s)
        self._lock: IO[str] | None = None

    async def open(self, *, server: bool = False) -> None:
        """Migrate. A server also registers itself and releases what a crashed predecessor left in flight."""
        if server and self.db.dialect == "sqlite":
            self._take_lock()
        applied = await self.db.migrate()
        if applied:
            log.info("database migrated: %s", ", ".join(applied))
        if server:
            released = await self.quota.recover(everyone_else=self.db.dialect == "sqlite", starting=True)
            await self.quota.heartbeat()
            if released:
                log.warning("released %d reservations left by a server that stopped mid-request", released)

    def _take_lock(self) -> None:
        """One server per SQLite file: a second one would release the first one's reservations."""
        path = sa.engine.make_url(self.db.url).database
        if not path or path == ":memory:":
            return
        fd = os.open(f"{path}.lock", os.O_CREAT | os.O_WRONLY, 0o600)
        handle = open(fd, "w")  # noqa: SIM115 (held for the life of the server)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise DatabaseBusy(
                f"Another Ting server is using {path}. Run one server per SQLite database, or share a "
                f"PostgreSQL database between replicas (--database postgresql://...)."
            ) from None
        self._lock = handle

    async def secret(self, name: str) -> bytes:
        """A server-wide secret (e.g. for signing upload policies), made on first use, shared by replicas."""

        def work(conn: sa.Connection) -> str:
            query = sa.select(server_secrets.c.value).where(server_secrets.c.name == name)
            value = conn.execute(query).scalar()
            if value is None:
                value = secrets.token_hex(32)
                conn.execute(server_secrets.insert().values(name=name, value=value))
            return str(value)

        rows = await self.db.read(sa.select(server_secrets.c.value).where(server_secrets.c.name == name))
        return bytes.fromhex(rows[0][0] if rows else await self.db.write(work))

    async def close(self) -> None:
        await self.db.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
