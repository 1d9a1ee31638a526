"""Quotas, rate limits and exactly-once settlement.

A request's life in the database, each step one transaction:

  admit     checks the key's requests-per-minute window, its requests in flight and that some balance is
            left; writes a reservation row (the request is now in flight and will be settled). A refusal
            writes its ledger row instead.
  reserve   once the prompt is known: reserves the most the request can cost (audio + prompt text + max
            output), atomically: `reserved += n WHERE quota - spent - reserved >= n`. Never more spent
            than granted, never negative (the table's CHECK constraints are the backstop). Without a
            database key (static keys, an open server) there is no balance: nothing is written, and
            the caller hands the amount to settle.
  settle    charges the real usage, whatever the outcome: what the model ran for it, at most the reservation
            (a request that fails before the model runs has none); releases the rest, writes the ledger row and
            deletes the reservation. Only the transaction that deletes the reservation writes the ledger
            row, so a request is settled exactly once, however often settle is called.
  recover   releases the reservations of a server that died mid-request, writing their ledger rows
            ("interrupted", nothing charged).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from ting.errors import AccessDenied, AuthError, ConcurrencyLimited, QuotaExhausted, RateLimited, TingError
from ting.store.db import (
    MODEL_COLUMN_CHARS,
    Database,
    Work,
    api_keys,
    bounded,
    instances,
    ledger,
    rate_windows,
    reservations,
)
from ting.store.keys import Principal
from ting.types import Usage

WINDOW_S = 60  # requests per minute: counted per whole minute, limited over a sliding one (_count_request)
HEARTBEAT_S = 10.0  # how often a server says it is alive (--instance-heartbeat-s)
STALE_S = 45.0  # a server silent this long is dead: its reservations are released (--instance-timeout-s)


def _allowed(rpm: int, previous: int, elapsed: float) -> int:
    """How many requests the current minute may hold: n + previous * (1 - elapsed) < rpm  <=>  n < allowed."""
    return math.ceil(rpm - previous * (1.0 - elapsed))


def _seconds_until_one_fits(rpm: int, counts: dict[int, int], now: float) -> int:
    """Whole seconds until a request fits, with no other request meanwhile (at most two minutes: all slid out)."""
    for wait in range(1, 2 * WINDOW_S):
        t = now + wait
        window = int(t // WINDOW_S)
        if counts.get(window, 0) < _allowed(rpm, counts.get(window - 1, 0), (t - window * WINDOW_S) / WINDOW_S):
            return wait
    return 2 * WINDOW_S


@dataclass(frozen=True)
class Outcome:
    """How a request ended, for its ledger row."""

    status: str  # ok | refused | error | aborted | interrupted
    usage: Usage = field(default_factory=Usage)
    audio_seconds: float = 0.0
    error_code: str | None = None
    latency_ms: int = 0


class Quota:
    def __init__(self, db: Database, instance_id: str, *, stale_s: float = STALE_S) -> None:
        self.db = db
        self.instance_id = instance_id
        self.stale_s = stale_s

    def _key_row(self, conn: sa.Connection, key_id: str) -> sa.Row[Any]:
        query = sa.select(api_keys).where(api_keys.c.id == key_id)
        if self.db.for_update:
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            raise AuthError()
        return row

    async def admit(
        self, who: Principal, request_id: str, *, model: str, protocol: str, now: float | None = None
    ) -> None:
        """Start a request, or raise (after writing its ledger row) when a limit refuses it."""
        at = time.time() if now is None else now
        model = bounded(model, MODEL_COLUMN_CHARS)

        def work(conn: sa.Connection) -> TingError | None:
            refusal = None if who.key_id is None else self._check_limits(conn, who.key_id, at)
            if refusal is None:
                conn.execute(
                    reservations.insert().values(
                        request_id=request_id,
                        key_id=who.key_id,
                        tokens=0,
                        model=model,
                        protocol=protocol,
                        instance_id=self.instance_id,
                        created_at=at,
                    )
                )
            else:
                conn.execute(
                    ledger.insert().values(
                        request_id=request_id,
                        key_id=who.key_id,
                        model=model,
                        protocol=protocol,
                        status="refused",
                        error_code=refusal.code,
                        created_at=at,
                    )
                )
            return refusal

        refusal = await self.db.write(work)
        if refusal is not None:
            raise refusal

    def _check_limits(self, conn: sa.Connection, key_id: str, now: float) -> TingError | None:
        key = self._key_row(conn, key_id)
        if key.revoked_at is not None:
            return AuthError()
        if key.expires_at is not None and key.expires_at <= now:
            return AccessDenied("The API key has expired.")
        if key.quota_tokens is not None and key.spent_tokens + key.reserved_tokens >= key.quota_tokens:
            return QuotaExhausted()
        if key.max_concurrency is not None:
            in_flight = conn.execute(
                sa.select(sa.func.count()).select_from(reservations).where(reservations.c.key_id == key_id)
            ).scalar_one()
            if in_flight >= key.max_concurrency:
                return ConcurrencyLimited()
        if key.rpm is not None:
            return self._count_request(conn, key_id, key.rpm, now)
        return None

    def _count_request(self, conn: sa.Connection, key_id: str, rpm: int, now: float) -> TingError | None:
        """Count a request against `rpm` over the last minute, or refuse it with the seconds until one fits.

        A sliding-window counter: the requests of the current minute plus the previous minute's, weighted by how
        much of the previous minute the last 60 s still cover. Unlike whole-minute windows it does not let a
        burst of 2 x rpm through across a minute's boundary; two rows per key, one atomic conditional update.
        """
        window = int(now // WINDOW_S)
        elapsed = (now - window * WINDOW_S) / WINDOW_S  # of the current minute, in [0, 1)
        counts = dict(
            conn.execute(
                sa.select(rate_windows.c.window_start, rate_windows.c.requests).where(
                    rate_windows.c.key_id == key_id, rate_windows.c.window_start >= window - 1
                )
            ).all()
        )
        allowed = _allowed(rpm, counts.get(window - 1, 0), elapsed)
        if counts.get(window, 0) < allowed:
            if window not in counts:
                conn.execute(rate_windows.insert().values(key_id=key_id, window_start=window, requests=1))
                conn.execute(
                    rate_windows.delete().where(
                        rate_windows.c.key_id == key_id, rate_windows.c.window_start < window - 1
                    )
                )
                return None
            counted = conn.execute(
                rate_windows.update()
                .where(  # atomic: a concurrent count may have won
                    rate_windows.c.key_id == key_id,
                    rate_windows.c.window_start == window,
                    rate_windows.c.requests < allowed,
                )
                .values(requests=rate_windows.c.requests + 1)
            )
            if counted.rowcount == 1:
                return None
            counts[window] = conn.execute(
                sa.select(rate_windows.c.requests).where(
                    rate_windows.c.key_id == key_id, rate_windows.c.window_start == window
                )
            ).scalar_one()
        return RateLimited(retry_after_s=_seconds_until_one_fits(rpm, counts, now))

    async def reserve(self, who: Principal, request_id: str, tokens: int) -> None:
        """Reserve `tokens` for an admitted request, or settle it as refused and raise QuotaExhausted.

        Only a database key has a balance to reserve from. For a static key or an open server there is nothing to
        write: the caller keeps the amount and hands it to `settle` (`reserved`), which caps the charge with it, as
        it caps a key's charge with the reservation row (one transaction less per request: bench/server.py)."""
        key_id = who.key_id
        if key_id is None:
            return

        def work(conn: sa.Connection) -> bool:
            granted = conn.execute(
                api_keys.update()
                .where(
                    api_keys.c.id == key_id,
                    sa.or_(
                        api_keys.c.quota_tokens.is_(None),
                        api_keys.c.quota_tokens - api_keys.c.spent_tokens - api_keys.c.reserved_tokens >= tokens,
                    ),
                )
                .values(reserved_tokens=api_keys.c.reserved_tokens + tokens)
            )
            if granted.rowcount == 0:
                self._settle(conn, request_id, Outcome("refused", error_code=QuotaExhausted.code), time.time())
                return False
            conn.execute(reservations.update().where(reservations.c.request_id == request_id).values(tokens=tokens))
            return True

        if not await self.db.write(work):
            raise QuotaExhausted()

    async def settle(self, request_id: str, outcome: Outcome, now: float | None = None, *, reserved: int = 0) -> bool:
        """Charge and record a request. False when it was already settled (a no-op). `reserved`: what `reserve`
        was asked for a request without a database key (a key's reservation is in its row)."""
        at = time.time() if now is None else now
        return await self.db.write(lambda conn: self._settle(conn, request_id, outcome, at, reserved=reserved))

    def _settle(
        self,
        conn: sa.Connection,
        request_id: str,
        outcome: Outcome,
        now: float,
        *,
        only_if: list[sa.ColumnElement[bool]] | None = None,
        reserved: int = 0,
    ) -> bool:
        query = sa.select(reservations).where(reservations.c.request_id == request_id, *(only_if or []))
        if self.db.for_update:
            query = query.with_for_update()
        held = conn.execute(query).first()
        if held is None:
            return False
        deleted = conn.execute(reservations.delete().where(reservations.c.request_id == request_id))
        if deleted.rowcount != 1:  # another transaction settled it first
            return False
        cap = held.tokens if held.key_id is not None else reserved  # what was reserved (nothing: refused before)
        charged = min(outcome.usage.total_tokens, cap)  # what ran, at most that
        if held.key_id is not None:
            conn.execute(
                api_keys.update()
                .where(api_keys.c.id == held.key_id)
                .values(
                    spent_tokens=api_keys.c.spent_tokens + charged,
                    reserved_tokens=api_keys.c.reserved_tokens - held.tokens,
                )
            )
        u = outcome.usage
        conn.execute(
            ledger.insert().values(
                request_id=request_id,
                key_id=held.key_id,
                model=held.model,
                protocol=held.protocol,
                status=outcome.status,
                error_code=outcome.error_code,
                audio_seconds=round(outcome.audio_seconds, 3),
                audio_tokens=u.audio_tokens,
                input_tokens=u.input_tokens,
                output_tokens=u.output_tokens,
                charged_tokens=charged,
                latency_ms=outcome.latency_ms,
                created_at=now,
            )
        )
        return True

    # --- liveness and crash recovery ------------------------------------------------------------------------

    async def heartbeat(self, now: float | None = None) -> None:
        at = time.time() if now is None else now

        def work(conn: sa.Connection) -> None:
            updated = conn.execute(instances.update().where(instances.c.id == self.instance_id).values(heartbeat_at=at))
            if updated.rowcount == 0:
                conn.execute(instances.insert().values(id=self.instance_id, started_at=at, heartbeat_at=at))

        await self.db.write_aside(work)

    async def recover(self, *, everyone_else: bool = False, starting: bool = False, now: float | None = None) -> int:
        """Release reservations left by dead servers; returns how many.

        `everyone_else`: every other server is dead (SQLite, where one server owns the database file).
        Otherwise a server is dead when its heartbeat is older than `stale_s`. `starting`: this server has nothing
        in flight yet, so whatever is under its own name was left by its previous life (killed, restarted).

        Each orphan is released in a transaction of its own, and only if it is still an orphan then: a transaction
        that held one request's key row while it waited for another request's reservation could deadlock with
        that request's own settlement.
        """
        at = time.time() if now is None else now
        orphaned: list[sa.ColumnElement[bool]] = []
        if not everyone_else:
            alive = sa.select(instances.c.id).where(
                instances.c.heartbeat_at >= at - self.stale_s, instances.c.id != self.instance_id
            )
            orphaned.append(reservations.c.instance_id.not_in(alive))
        if not starting:
            orphaned.append(reservations.c.instance_id != self.instance_id)
        orphans = [row.request_id for row in await self.db.read(sa.select(reservations.c.request_id).where(*orphaned))]
        released = 0
        interrupted = Outcome("interrupted", error_code="ServerRestarted")

        def release(request_id: str) -> Work[bool]:
            return lambda conn: self._settle(conn, request_id, interrupted, at, only_if=orphaned)

        for request_id in orphans:
            released += await self.db.write(release(request_id))
        await self.db.write(
            lambda conn: conn.execute(instances.delete().where(instances.c.heartbeat_at < at - 24 * 3600))
        )
        return released

    async def in_flight(self) -> int:
        rows = await self.db.read(sa.select(sa.func.count()).select_from(reservations))
        return int(rows[0][0])
