"""Helpers for long responses: keep-alive during silence, and noticing a client that hung up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
from starlette.requests import Request

T = TypeVar("T")
HEARTBEAT = object()  # yielded by with_heartbeats when nothing happened for a while


async def with_heartbeats(source: AsyncIterator[T], every_s: float) -> AsyncIterator[T | object]:
    """Items of `source`, with HEARTBEAT whenever `every_s` seconds pass without one."""
    iterator = aiter(source)
    pending: asyncio.Task[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield HEARTBEAT
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


class ClientGone(Exception):
    """The client hung up before its (non-streaming) answer was ready; the work was cancelled."""


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


async def shielded(cleanup: Callable[[], Awaitable[None]]) -> None:
    """Run `cleanup` to the end even when the surrounding task is being cancelled (a client gone)."""
    with anyio.CancelScope(shield=True):
        await cleanup()
