"""A small misbehaving HTTP origin on 127.0.0.1, for the download tests.

Each route is a coroutine that writes raw bytes, so a test can lie about lengths, drip bytes, never answer
or redirect anywhere. The origin records every request it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

Route = Callable[[asyncio.StreamWriter, "Request"], Awaitable[None]]


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Origin:
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Origin:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
            request = Request(method, target, headers)
            self.requests.append(request)
            route = self.routes.get(target.split("?")[0])
            if route is None:
                await send(writer, 404, b"not found")
            else:
                await route(writer, request)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


async def send(writer: asyncio.StreamWriter, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    hdrs = {"Content-Length": str(len(body)), "Connection": "close", **(headers or {})}
    writer.write(
        f"HTTP/1.1 {status} X\r\n".encode()
        + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()).encode()
        + b"\r\n"
        + body
    )
    await writer.drain()


def body(data: bytes, headers: dict[str, str] | None = None, status: int = 200) -> Route:
    async def route(writer: asyncio.StreamWriter, request: Request) -> None:
        await send(writer, status, data, headers)

    return route


def redirect(location: str | Callable[[], str], status: int = 302) -> Route:
    async def route(writer: asyncio.StreamWriter, request: Request) -> None:
        target = location() if callable(location) else location
        await send(writer, status, b"", {"Location": target})

    return route
