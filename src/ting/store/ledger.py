"""Reading the ledger: one row per request, summarised per key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ting.store.db import Database, api_keys, ledger


@dataclass(frozen=True)
class UsageSummary:
    key_id: str | None
    key_name: str
    requests: int
    ok: int
    refused: int
    failed: int  # error, aborted, interrupted
    audio_seconds: float
    audio_tokens: int
    input_tokens: int
    output_tokens: int
    charged_tokens: int


class Ledger:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def summary(self, *, key_id: str | None = None, since: float | None = None) -> list[UsageSummary]:
        status = ledger.c.status

        def count_if(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[int]:
            return sa.func.sum(sa.case((condition, 1), else_=0))

        query = (
            sa.select(
                ledger.c.key_id,
                sa.func.max(api_keys.c.name),
                sa.func.count(),
                count_if(status == "ok"),
                count_if(status == "refused"),
                count_if(status.in_(["error", "aborted", "interrupted"])),
                sa.func.sum(ledger.c.audio_seconds),
                sa.func.sum(ledger.c.audio_tokens),
                sa.func.sum(ledger.c.input_tokens),
                sa.func.sum(ledger.c.output_tokens),
                sa.func.sum(ledger.c.charged_tokens),
            )
            .select_from(ledger.outerjoin(api_keys, api_keys.c.id == ledger.c.key_id))
            .group_by(ledger.c.key_id)
            .order_by(ledger.c.key_id)
        )
        if key_id is not None:
            query = query.where(ledger.c.key_id == key_id)
        if since is not None:
            query = query.where(ledger.c.created_at >= since)
        rows = await self.db.read(query)
        return [
            UsageSummary(
                r[0],
                r[1] or ("(static or open)" if r[0] is None else ""),
                int(r[2]),
                int(r[3] or 0),
                int(r[4] or 0),
                int(r[5] or 0),
                float(r[6] or 0),
                int(r[7] or 0),
                int(r[8] or 0),
                int(r[9] or 0),
                int(r[10] or 0),
            )
            for r in rows
        ]

    async def rows(self, *, limit: int = 100_000) -> list[sa.Row[Any]]:
        return await self.db.read(sa.select(ledger).order_by(ledger.c.id).limit(limit))
