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


_END, _BEAT = object(), object()


async def with_heartbeats(source: AsyncIterable[T], every_s: float) -> AsyncIterator[T | None]:
    """Items of `source`, with None whenever `every_s` seconds pass without one (time for a keep-alive).

    One task pulls `source` into a queue, and one timer puts a beat in it when the queue has been silent for
    `every_s`: nothing per item but the queue. (A task and asyncio.wait for every item cost 22 us an item, a tenth
    of the event loop's time per streamed token.)"""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    last = loop.time()  # when the queue last got something
    timer: asyncio.TimerHandle | None = None

    def put(item: Any) -> None:
        nonlocal last
        last = loop.time()
        queue.put_nowait(item)

    def beat() -> None:
        nonlocal timer
        if loop.time() - last >= every_s:
            put(_BEAT)
        timer = loop.call_at(last + every_s, beat)

    async def pull() -> None:
        try:
            async for item in source:
                put(item)
        except BaseException as exc:  # handed to the consumer, which raises it (cancelled: nobody is waiting)
            put(_Failed(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            put(_END)

    timer = loop.call_at(last + every_s, beat)
    puller = asyncio.ensure_future(pull())
    try:
        while True:
            item = await queue.get()
            if item is _BEAT:
                yield None
            elif item is _END:
                return
            elif isinstance(item, _Failed):
                raise item.exc
            else:
                yield item
    finally:
        if timer is not None:
            timer.cancel()
        if not puller.done():
            puller.cancel()
            with contextlib.suppress(BaseException):
                await puller


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


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
