"""Uploaded files behind oss:// keys (the DashScope SDK's file:// flow), kept 48 hours.

Where the bytes live follows the database. On SQLite (one server) they live on disk under the data directory,
each in a file with a random name (the client's file name is never a path here). On PostgreSQL (replicas) they
live in the database itself (table upload_data, one row per object, deleted with its upload row), so that an
upload received by one replica is read by whichever replica serves the generation. The uploads table maps the
object key to its bytes and to the key that uploaded it; only that key can use it. As on OSS with
x-oss-forbid-overwrite, a key is written once. Expired uploads are purged; what one API key keeps at once is
bounded by --upload-quota-bytes either way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ting.errors import DownloadFailed, UploadRejected
from ting.store.db import MODEL_COLUMN_CHARS, Database, bounded, private_dir, upload_data, uploads

log = logging.getLogger("ting.store")


def _already_exists() -> UploadRejected:
    return UploadRejected(
        "The object you specified already exists and can not be overwritten.", status=409, code="FileAlreadyExists"
    )


class FileStore:
    def __init__(self, db: Database, root: Path, *, ttl_s: float, in_database: bool | None = None) -> None:
        """`root`: the uploads directory (uploads in progress always, the kept bytes on SQLite).
        `in_database`: keep the bytes in the database; by default on PostgreSQL, where replicas share it."""
        self.db = db
        self.root = root
        self.ttl_s = ttl_s
        self.in_database = db.dialect == "postgresql" if in_database is None else in_database

    def temp_path(self) -> Path:
        """A fresh file for an upload in progress (same file system as its final place)."""
        private_dir(self.root)
        path = self.root / f".incoming-{secrets.token_hex(12)}"
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return path

    async def check_room(
        self,
        policy_dir: str,
        *,
        owner: str,
        size: int,
        max_owner_bytes: int,
        max_objects: int,
        now: float | None = None,
    ) -> None:
        """Refuse, before anything is read, an upload that its policy or its key's storage has no room for."""
        at = time.time() if now is None else now
        await self.db.query(
            lambda conn: self._check_room(
                conn,
                policy_dir,
                owner=owner,
                size=size,
                max_owner_bytes=max_owner_bytes,
                max_objects=max_objects,
                now=at,
            )
        )

    def _check_room(
        self,
        conn: sa.Connection,
        policy_dir: str,
        *,
        owner: str,
        size: int,
        max_owner_bytes: int,
        max_objects: int,
        now: float,
    ) -> None:
        under_policy = conn.execute(
            sa.select(sa.func.count())
            .select_from(uploads)
            .where(uploads.c.object_key.startswith(policy_dir + "/", autoescape=True))
        ).scalar_one()
        if under_policy >= max_objects:
            raise UploadRejected(
                f"Invalid according to Policy: a policy uploads at most {max_objects} object(s); ask for a new one."
            )
        kept = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(uploads.c.size), 0)).where(
                uploads.c.owner == owner, uploads.c.expires_at > now
            )
        ).scalar_one()
        if int(kept) + size > max_owner_bytes:
            raise UploadRejected(
                f"Upload storage for this API key is full: it keeps {int(kept)} bytes of uploads "
                f"and may keep {max_owner_bytes} (uploads are deleted {self.ttl_s / 3600:g} h "
                f"after they are made).",
                code="QuotaExceeded",
            )

    async def commit(
        self,
        object_key: str,
        *,
        owner: str,
        model: str,
        temp: Path,
        size: int,
        policy_dir: str | None = None,
        max_owner_bytes: int | None = None,
        max_objects: int = 1,
        now: float | None = None,
    ) -> None:
        """Keep an uploaded file (written to `temp`) under `object_key`. A commit that fails leaves no file.

        With `policy_dir` and `max_owner_bytes`, the policy's object count and the owner's stored bytes are
        checked again inside the transaction (one owner's commits take turns on PostgreSQL). In the database,
        the bytes are written in the same transaction as their row; on disk, the file is moved into place."""
        at = time.time() if now is None else now
        name = "" if self.in_database else secrets.token_hex(16)
        kept = self.root / name if name else None

        def work(conn: sa.Connection) -> None:
            if self.db.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:owner))"), {"owner": owner})
            existing = conn.execute(sa.select(uploads).where(uploads.c.object_key == object_key)).first()
            if existing is not None and existing.expires_at > at:
                raise _already_exists()
            if existing is not None:
                self._delete(conn, [object_key])
                self._unlink(existing.path)
            if policy_dir is not None and max_owner_bytes is not None:
                self._check_room(
                    conn,
                    policy_dir,
                    owner=owner,
                    size=size,
                    max_owner_bytes=max_owner_bytes,
                    max_objects=max_objects,
                    now=at,
                )
            conn.execute(
                uploads.insert().values(
                    object_key=object_key,
                    owner=owner,
                    model=bounded(model, MODEL_COLUMN_CHARS),
                    path=name,
                    size=size,
                    created_at=at,
                    expires_at=at + self.ttl_s,
                )
            )
            if data is not None:
                conn.execute(upload_data.insert().values(object_key=object_key, data=data))
            else:
                assert kept is not None
                os.replace(temp, kept)

        try:
            data = await asyncio.to_thread(temp.read_bytes) if self.in_database else None
            await self.db.write(work)
        except sa.exc.IntegrityError:  # PostgreSQL: another upload of the same key committed first
            self._unlink(name)
            raise _already_exists() from None
        except BaseException:
            self._unlink(name)
            raise
        finally:
            temp.unlink(missing_ok=True)

    async def read_object(self, key: str, *, owner: str | None) -> bytes:
        """The bytes behind an oss:// key (ting.audio.ObjectStore)."""
        now = time.time()
        rows = await self.db.read(sa.select(uploads).where(uploads.c.object_key == key))
        if not rows or rows[0].expires_at <= now or rows[0].owner != owner:
            raise DownloadFailed(
                "Failed to download multimodal content: no such uploaded file for this API key "
                "(uploads are kept 48 hours)."
            )
        if not rows[0].path:  # in the database
            data = await self.db.read(sa.select(upload_data.c.data).where(upload_data.c.object_key == key))
            if not data:
                raise DownloadFailed()
            return bytes(data[0].data)
        try:
            return await asyncio.to_thread((self.root / rows[0].path).read_bytes)
        except OSError:
            raise DownloadFailed() from None

    async def purge(self, now: float | None = None) -> int:
        """Delete expired uploads; returns how many."""
        at = time.time() if now is None else now

        def work(conn: sa.Connection) -> list[Any]:
            expired = list(
                conn.execute(sa.select(uploads.c.object_key, uploads.c.path).where(uploads.c.expires_at <= at))
            )
            self._delete(conn, [row.object_key for row in expired])
            return expired

        expired = await self.db.write(work)
        for row in expired:
            self._unlink(row.path)
        return len(expired)

    @staticmethod
    def _delete(conn: sa.Connection, object_keys: list[str]) -> None:
        """Delete uploads and the bytes kept in the database for them (also its foreign key's cascade)."""
        for start in range(0, len(object_keys), 500):
            batch = object_keys[start : start + 500]
            conn.execute(upload_data.delete().where(upload_data.c.object_key.in_(batch)))
            conn.execute(uploads.delete().where(uploads.c.object_key.in_(batch)))

    def _unlink(self, name: str) -> None:
        if not name:  # the bytes were in the database
            return
        try:
            (self.root / name).unlink()
        except FileNotFoundError:
            pass
        except OSError:
            log.warning("could not delete expired upload %s", name)
