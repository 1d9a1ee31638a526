"""DNS-rebinding and cross-site protection for an open server (no API key configured), as Ollama and Jupyter
added after their CVEs.

A web page the user visits can make their browser send requests to 127.0.0.1 — through a DNS name it
re-points at 127.0.0.1 (rebinding: the Host header then carries the attacker's name) or directly as a
cross-site form POST (the Origin header then names the attacker's site). With no key to guess, an open server
would answer both. So, while no key is configured:

- the Host header must be a loopback name (localhost, *.localhost), an IP address (a rebinding attack needs a
  name it controls), --public-url's host, or one of --allowed-hosts ("*" turns the check off);
- a request with an Origin header must come from the same origin, or from one of --cors-origins.

Once any key exists (static or in the database), requests need it and neither check applies, so a server
behind a reverse proxy that forwards its own Host keeps working.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from ting.api.middleware import ErrorRenderer
from ting.errors import AccessDenied

LOOPBACK_NAMES = ("localhost",)


def split_host(host: str) -> str:
    """The name in a Host header (or an origin's netloc), without port or IPv6 brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostPolicy:
    def __init__(self, *, allowed_hosts: tuple[str, ...], public_url: str, cors_origins: tuple[str, ...]) -> None:
        self.any_host = "*" in allowed_hosts
        names = {split_host(h) for h in allowed_hosts if h and h != "*"}
        if public_url:
            names.add(split_host(urlsplit(public_url).netloc))
        self.names = frozenset(n for n in names if n)
        self.origins = frozenset(o.rstrip("/").lower() for o in cors_origins)

    def host_allowed(self, host: str) -> bool:
        name = split_host(host)
        return (
            self.any_host
            or not name
            or name in LOOPBACK_NAMES
            or name.endswith(".localhost")
            or _is_ip(name)
            or name in self.names
        )

    def origin_allowed(self, origin: str | None, host: str) -> bool:
        if origin is None:
            return True  # not a browser's cross-origin request (curl, SDKs, same-origin GETs)
        origin = origin.strip().rstrip("/").lower()
        if "*" in self.origins or origin in self.origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc == host.strip().lower()


class HostGuard:
    """Pure ASGI: refuse (403, in the protocol's envelope) foreign Host names and cross-site requests while the
    server has no key. `is_open` is only asked about requests that fail a check, so local traffic costs nothing."""

    def __init__(
        self, app: ASGIApp, *, policy: HostPolicy, is_open: Callable[[], Awaitable[bool]], render: ErrorRenderer
    ) -> None:
        self.app, self.policy, self.is_open, self.render = app, policy, is_open, render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        host = headers.get(b"host", b"").decode("latin-1")
        origin_raw = headers.get(b"origin")
        origin = origin_raw.decode("latin-1") if origin_raw is not None else None
        problem = None
        if not self.policy.host_allowed(host):
            problem = (
                f"Host {split_host(host)!r} is not allowed: a server without API keys answers only to "
                f"localhost, IP addresses, --public-url and --allowed-hosts (DNS-rebinding protection)."
            )
        elif not self.policy.origin_allowed(origin, host):
            problem = (
                f"Cross-origin request from {origin!r} refused: a server without API keys accepts browser "
                f"requests only from its own origin and --cors-origins."
            )
        if problem is not None and await self.is_open():
            status, response_headers, body = self.render(scope, AccessDenied(problem))
            await send({"type": "http.response.start", "status": status, "headers": response_headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
