"""What both protocols' responses share: server-sent event streams with keep-alive comments, noticing a client
that hung up, compact JSON and the Retry-After header.

A stream is one skeleton (`event_stream`) and a protocol's `Framing`: how the opening, each chunk, the end, a
keep-alive and an error look on its wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Iterable
from typing import Any, Protocol, TypeVar

from starlette.requests import Request

from ting.errors import TingError
from ting.service import ClientGone, Generation
from ting.types import GenerationChunk

T = TypeVar("T")


def compact_json(obj: Any) -> bytes:
    """Single-line JSON without spaces, UTF-8 as is: what DashScope sends, and fine for OpenAI's side."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def retry_after(exc: TingError) -> dict[str, str]:
    """The Retry-After header for a 429/503 that knows when to come back (whole seconds, at least 1)."""
    return {"retry-after": str(max(1, round(exc.retry_after_s)))} if exc.retry_after_s else {}


async def with_heartbeats(source: AsyncIterable[T], every_s: float) -> AsyncIterator[T | None]:
    """Items of `source`, with None whenever `every_s` seconds pass without one (time for a keep-alive)."""
    iterator = aiter(source)
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield None
                continue
            task, pending = pending, None
            try:
                yield task.result()
            except StopAsyncIteration:
                return
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending


class Framing(Protocol):
    """How one protocol frames a streamed answer."""

    keepalive: bytes

    def opening(self) -> Iterable[bytes]: ...

    def chunk(self, chunk: GenerationChunk) -> Iterable[bytes]: ...

    def closing(self) -> Iterable[bytes]: ...

    def error(self, exc: TingError) -> bytes: ...


async def event_stream(gen: Generation, framing: Framing, heartbeat_s: float) -> AsyncIterator[bytes]:
    """A started generation as server-sent events. The request is settled before its last event goes out (the
    Generation sees to it) and on every other way out of this stream."""
    async with gen:
        try:
            for frame in framing.opening():
                yield frame
            async for chunk in with_heartbeats(gen, heartbeat_s):
                if chunk is None:
                    yield framing.keepalive
                    continue
                for frame in framing.chunk(chunk):
                    yield frame
            for frame in framing.closing():
                yield frame
        except TingError as exc:
            yield framing.error(exc)


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client hangs up first, cancel it (the request is then aborted) and raise ClientGone."""
    task = asyncio.ensure_future(work)
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone = True
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if gone and (current is None or not current.cancelling()):  # we cancelled the work, nobody cancelled us
            raise ClientGone() from None
        raise
    finally:
        watcher.cancel()
