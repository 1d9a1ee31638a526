"""Credentials on the wire: `Authorization: Bearer <key>` (both protocols)."""

from __future__ import annotations

from starlette.requests import Request


def bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
