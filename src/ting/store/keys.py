"""API keys: created once and shown once; only a SHA-256 and a short display prefix are stored.

Keys carry 256 random bits behind a recognisable prefix (`sk-ting-`), so a fast hash is enough (slow KDFs
are for low-entropy passwords) and secret scanners can spot a leaked key. Requests are matched by hash, so
nothing compares a secret byte by byte; static keys from the command line are compared with
hmac.compare_digest.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ting.errors import AccessDenied, AuthError, NotFound
from ting.store.db import Database, api_keys

KEY_PREFIX = "sk-ting-"
DISPLAY_CHARS = 12  # how much of a key listings show: "sk-ting-Ab12"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    prefix: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    quota_tokens: int | None
    spent_tokens: int
    reserved_tokens: int
    rpm: int | None
    max_concurrency: int | None

    @property
    def remaining_tokens(self) -> int | None:
        if self.quota_tokens is None:
            return None
        return self.quota_tokens - self.spent_tokens - self.reserved_tokens

    def state(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    key_id: str | None  # a database key, or None for a static key or an open server
    name: str
    owner: str  # stable and not secret: uploaded files are bound to it
    rpm: int | None = None
    max_concurrency: int | None = None


def _info(row: sa.Row[Any]) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        quota_tokens=row.quota_tokens,
        spent_tokens=row.spent_tokens,
        reserved_tokens=row.reserved_tokens,
        rpm=row.rpm,
        max_concurrency=row.max_concurrency,
    )


class Keys:
    def __init__(self, db: Database, static_keys: Iterable[str] = ()) -> None:
        self.db = db
        self._static = [hash_key(k) for k in static_keys if k]

    async def create(
        self,
        *,
        name: str = "",
        quota_tokens: int | None = None,
        expires_days: float | None = None,
        rpm: int | None = None,
        max_concurrency: int | None = None,
        now: float | None = None,
    ) -> tuple[str, KeyInfo]:
        """A new key: (the key itself, shown only now; what is stored)."""
        now = time.time() if now is None else now
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        values = dict(
            id="key_" + secrets.token_hex(8),
            name=name,
            prefix=key[:DISPLAY_CHARS],
            key_hash=hash_key(key),
            created_at=now,
            expires_at=now + expires_days * 86400 if expires_days else None,
            revoked_at=None,
            quota_tokens=quota_tokens,
            spent_tokens=0,
            reserved_tokens=0,
            rpm=rpm,
            max_concurrency=max_concurrency,
        )
        await self.db.write(lambda conn: conn.execute(api_keys.insert().values(**values)))
        return key, KeyInfo(**{k: v for k, v in values.items() if k != "key_hash"})  # type: ignore[arg-type]

    async def list(self) -> list[KeyInfo]:
        rows = await self.db.read(sa.select(api_keys).order_by(api_keys.c.created_at))
        return [_info(r) for r in rows]

    async def find(self, id_or_prefix: str) -> KeyInfo:
        """A key by its id or (unambiguous) display prefix."""
        rows = await self.db.read(
            sa.select(api_keys).where(
                sa.or_(api_keys.c.id == id_or_prefix, api_keys.c.prefix.startswith(id_or_prefix, autoescape=True))
            )
        )
        if len(rows) != 1:
            raise NotFound(f"No single key matches {id_or_prefix!r}." if rows else f"No key {id_or_prefix!r}.")
        return _info(rows[0])

    async def revoke(self, id_or_prefix: str, now: float | None = None) -> KeyInfo:
        key = await self.find(id_or_prefix)
        revoked = (
            api_keys.update()
            .where(api_keys.c.id == key.id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=time.time() if now is None else now)
        )
        await self.db.write(lambda conn: conn.execute(revoked))
        return await self.find(key.id)

    async def open(self) -> bool:
        """Whether no key is configured anywhere (then any caller is accepted)."""
        return not self._static and not await self.db.read(sa.select(api_keys.c.id).limit(1))

    async def owner_active(self, owner: str, now: float | None = None) -> bool:
        """Whether the caller an upload policy was issued to (a Principal's `owner`) may still upload."""
        now = time.time() if now is None else now
        kind, _, rest = owner.partition(":")
        if kind == "static":
            return any(h.startswith(rest) for h in self._static)
        if kind == "anon":
            return await self.open()
        rows = await self.db.read(sa.select(api_keys).where(api_keys.c.id == owner))
        return bool(rows) and _info(rows[0]).state(now) == "active"

    async def authenticate(self, token: str | None, now: float | None = None) -> Principal:
        """The caller behind a bearer token, or AuthError / AccessDenied."""
        now = time.time() if now is None else now
        digest = hash_key(token) if token else ""
        if digest and any(hmac.compare_digest(digest, h) for h in self._static):
            return Principal(key_id=None, name="static", owner="static:" + digest[:16])
        row, any_key = await self.db.query(lambda conn: _key_by_hash(conn, digest))
        if row is not None:
            key = _info(row)
            state = key.state(now)
            if state == "revoked":
                raise AuthError()  # indistinguishable from a key that never existed
            if state == "expired":
                raise AccessDenied("The API key has expired.")
            return Principal(
                key_id=key.id, name=key.name, owner=key.id, rpm=key.rpm, max_concurrency=key.max_concurrency
            )
        if self._static or any_key:
            raise AuthError()
        # An open server (no key configured anywhere): anyone may call; uploads are bound to their token.
        return Principal(key_id=None, name="anonymous", owner="anon:" + (digest[:16] or "none"))


def _key_by_hash(conn: sa.Connection, digest: str) -> tuple[sa.Row[Any] | None, bool]:
    """The key whose hash is `digest` (None: no such key), and whether any key exists (one round trip)."""
    row = conn.execute(sa.select(api_keys).where(api_keys.c.key_hash == digest)).first() if digest else None
    return row, row is not None or conn.execute(sa.select(api_keys.c.id).limit(1)).first() is not None
