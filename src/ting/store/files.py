"""Uploaded files behind oss:// keys (the DashScope SDK's file:// flow), kept 48 hours.

Bytes live on disk under the data directory, each in a file with a random name (the client's file name is
never a path here); the database maps the object key to that file and to the key that uploaded it. Only
that key can use it. As on OSS with x-oss-forbid-overwrite, a key is written once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ting.errors import DownloadFailed, UploadRejected
from ting.store.db import MODEL_COLUMN_CHARS, Database, bounded, private_dir, uploads

log = logging.getLogger("ting.store")


def _already_exists() -> UploadRejected:
    return UploadRejected(
        "The object you specified already exists and can not be overwritten.", status=409, code="FileAlreadyExists"
    )


class FileStore:
    def __init__(self, db: Database, root: Path, *, ttl_s: float) -> None:
        self.db = db
        self.root = root
        self.ttl_s = ttl_s

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
        now = time.time() if now is None else now
        async with self.db.engine.connect() as conn:
            await self._check_room(
                conn,
                policy_dir,
                owner=owner,
                size=size,
                max_owner_bytes=max_owner_bytes,
                max_objects=max_objects,
                now=now,
            )

    async def _check_room(
        self,
        conn: AsyncConnection,
        policy_dir: str,
        *,
        owner: str,
        size: int,
        max_owner_bytes: int,
        max_objects: int,
        now: float,
    ) -> None:
        under_policy = (
            await conn.execute(
                sa.select(sa.func.count())
                .select_from(uploads)
                .where(uploads.c.object_key.startswith(policy_dir + "/", autoescape=True))
            )
        ).scalar_one()
        if under_policy >= max_objects:
            raise UploadRejected(
                f"Invalid according to Policy: a policy uploads at most {max_objects} object(s); ask for a new one."
            )
        kept = (
            await conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(uploads.c.size), 0)).where(
                    uploads.c.owner == owner, uploads.c.expires_at > now
                )
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
        checked again inside the transaction (one owner's commits take turns on PostgreSQL)."""
        now = time.time() if now is None else now
        name = secrets.token_hex(16)
        kept = self.root / name
        try:
            async with self.db.write() as conn:
                if self.db.dialect == "postgresql":
                    await conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:owner))"), {"owner": owner})
                existing = (await conn.execute(sa.select(uploads).where(uploads.c.object_key == object_key))).first()
                if existing is not None and existing.expires_at > now:
                    raise _already_exists()
                if existing is not None:
                    await conn.execute(uploads.delete().where(uploads.c.object_key == object_key))
                    self._unlink(existing.path)
                if policy_dir is not None and max_owner_bytes is not None:
                    await self._check_room(
                        conn,
                        policy_dir,
                        owner=owner,
                        size=size,
                        max_owner_bytes=max_owner_bytes,
                        max_objects=max_objects,
                        now=now,
                    )
                await conn.execute(
                    uploads.insert().values(
                        object_key=object_key,
                        owner=owner,
                        model=bounded(model, MODEL_COLUMN_CHARS),
                        path=name,
                        size=size,
                        created_at=now,
                        expires_at=now + self.ttl_s,
                    )
                )
                await asyncio.to_thread(os.replace, temp, kept)
        except sa.exc.IntegrityError:  # PostgreSQL: another upload of the same key committed first
            kept.unlink(missing_ok=True)
            raise _already_exists() from None
        except BaseException:
            kept.unlink(missing_ok=True)
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
        try:
            return await asyncio.to_thread((self.root / rows[0].path).read_bytes)
        except OSError:
            raise DownloadFailed() from None

    async def purge(self, now: float | None = None) -> int:
        """Delete expired uploads; returns how many."""
        now = time.time() if now is None else now
        async with self.db.write() as conn:
            expired = list(
                await conn.execute(sa.select(uploads.c.object_key, uploads.c.path).where(uploads.c.expires_at <= now))
            )
            if expired:
                await conn.execute(uploads.delete().where(uploads.c.expires_at <= now))
        for row in expired:
            self._unlink(row.path)
        return len(expired)

    def _unlink(self, name: str) -> None:
        try:
            (self.root / name).unlink()
        except FileNotFoundError:
            pass
        except OSError:
            log.warning("could not delete expired upload %s", name)
