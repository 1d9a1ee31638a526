"""Pure ASGI middleware: request ids, the request-body limit, and one JSON access-log line per request."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ting.errors import PayloadTooLarge, TingError
from ting.service import Report

access_log = logging.getLogger("ting.access")
log = logging.getLogger("ting.server")

ErrorRenderer = Callable[[Scope, TingError], tuple[int, list[tuple[bytes, bytes]], bytes]]


class RequestContext:
    """Gives every HTTP request an id (scope state "request_id", header X-Request-Id) and an access-log line.

    The service fills in the request's Report (scope state "report": model, tokens, ...); the line is written once the
    response is over (or the client is gone). Nothing secret goes in it: no audio, no base64, no keys.
    An unexpected exception becomes a 500 in the protocol's envelope here, inside the request id's reach (status 499
    is kept for clients that really hung up).
    """

    def __init__(
        self, app: ASGIApp, *, render: ErrorRenderer, on_done: Callable[[Scope, int], None] | None = None
    ) -> None:
        self.app, self.render, self.on_done = app, render, on_done  # on_done(scope, status): the metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = str(uuid.uuid4())
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["report"] = report = Report()
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
        except Exception:  # a fault of ours: a 500 in the protocol's envelope, with the request id, logged once
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            if report.outcome is None:
                report.outcome, report.code = "error", "InternalError"
            if not status["code"]:
                code, headers, body = self.render(scope, TingError())
                await send_with_id({"type": "http.response.start", "status": code, "headers": headers})
                await send_with_id({"type": "http.response.body", "body": body})
        finally:
            line: dict[str, Any] = {
                "request_id": state.get("request_id", request_id),
                "method": scope["method"],
                "path": scope["path"],
                "status": status["code"] or 499,
                "latency_ms": int((time.monotonic() - started) * 1000),
            }
            line.update(report.fields())
            access_log.info(_json_line(line))
            if self.on_done is not None:
                try:
                    self.on_done(scope, line["status"])
                except Exception:
                    log.exception("counting %s %s failed", scope["method"], scope["path"])


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


class LargeBodyPacing:
    """Large request bodies are read and parsed one piece at a time, for at most a share of the event loop's time;
    small requests never wait.

    Reading and parsing megabytes (JSON with long texts or lists, multipart files) holds the event loop and the GIL
    in pieces of up to tens of milliseconds, so a flood of large bodies, refused or not, would take the loop from
    everyone. A body is large when it declares more than `threshold_bytes` or no length at all. Each piece of it is
    handed to the application only with the one turn, taken in order; the turn is given back once the loop has been
    free of it long enough that handling the piece took at most `share` of the time (the last piece's handling is
    the parsing, in the same step). A piece not yet handed over is not read from the socket (the server stops
    reading a request its application is not receiving); a slow sender holds no turn while its bytes trickle in.
    """

    def __init__(self, app: ASGIApp, *, threshold_bytes: int, share: float = 0.25) -> None:
        self.app, self.threshold_bytes, self.rest = app, threshold_bytes, 1 / share - 1
        self._turn: asyncio.Lock | None = None

    def _large(self, scope: Scope) -> bool:
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return False
        declared = dict(scope.get("headers", [])).get(b"content-length")
        return declared is None or not declared.isdigit() or int(declared) > self.threshold_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._large(scope):
            await self.app(scope, receive, send)
            return
        if self._turn is None:
            self._turn = asyncio.Lock()
        turn = self._turn

        async def paced_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                await turn.acquire()
                loop = asyncio.get_running_loop()
                started = loop.time()

                def done() -> None:  # runs once the step that handles this piece of the body has yielded
                    loop.call_later((loop.time() - started) * self.rest, turn.release)

                loop.call_soon(done)
            return message

        await self.app(scope, paced_receive, send)
