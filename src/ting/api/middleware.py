"""Pure ASGI middleware: request ids, the request-body limit, and one JSON access-log line per request."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ting.errors import PayloadTooLarge, TingError

access_log = logging.getLogger("ting.access")

ErrorRenderer = Callable[[Scope, TingError], tuple[int, list[tuple[bytes, bytes]], bytes]]


class RequestContext:
    """Gives every HTTP request an id (scope state "request_id", header X-Request-Id) and an access-log line.

    Routes add what they know (model, tokens, ...) to scope state "access"; the line is written once the
    response is over (or the client is gone). Nothing secret goes in it: no audio, no base64, no keys.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = str(uuid.uuid4())
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["access"] = access = {}
        started = time.monotonic()
        status = {"code": 0}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                rid = state.get("request_id", request_id).encode()
                message = {**message, "headers": [*headers, (b"x-request-id", rid)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            line: dict[str, Any] = {"request_id": state.get("request_id", request_id), "method": scope["method"],
                                    "path": scope["path"], "status": status["code"] or 499,
                                    "latency_ms": int((time.monotonic() - started) * 1000)}
            line.update(access)
            access_log.info(_json_line(line))


def _json_line(line: dict[str, Any]) -> str:
    """The access-log line as UTF-8 text; anything UTF-8 cannot hold (a lone surrogate) is written escaped."""
    text = json.dumps(line, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(line)
    return text


class BodyLimit:
    """Refuse request bodies over a limit, from Content-Length or while they stream in, before any parsing."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, per_path: dict[str, int], render: ErrorRenderer) -> None:
        self.app, self.max_bytes, self.per_path, self.render = app, max_bytes, per_path, render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"], self.max_bytes)
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, send, limit)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"Payload Too Large. The limit is {limit} bytes.")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except PayloadTooLarge:
            if not started:
                await self._refuse(scope, send, limit)

    async def _refuse(self, scope: Scope, send: Send, limit: int) -> None:
        status, headers, body = self.render(scope, PayloadTooLarge(f"Payload Too Large. The limit is {limit} bytes."))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
