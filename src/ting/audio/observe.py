"""What the audio layer tells an observer (the server's metrics): how long each fetch and decode took, and what
failed. The audio layer knows nothing of Prometheus; the api layer passes in an object with these two methods."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

T = TypeVar("T")


class AudioObserver(Protocol):
    def fetched(self, source: str, seconds: float, error: Exception | None) -> None:
        """One audio reference read: `source` is http | data | oss | other; `error` what refused it, if anything."""

    def decoded(self, seconds: float, error: Exception | None) -> None:
        """One audio file decoded (in a worker process), or refused (`error`)."""


def source_kind(source: str) -> str:
    """http | data | oss | other: the kind of an audio reference, never the reference itself."""
    scheme = source.split(":", 1)[0].lower() if ":" in source else ""
    if scheme in ("http", "https"):
        return "http"
    return scheme if scheme in ("data", "oss") else "other"


async def timed(work: Awaitable[T], report: Callable[[float, Exception | None], None] | None) -> T:
    """Await `work`, telling `report` how long it took and how it failed (a cancellation is not reported)."""
    if report is None:
        return await work
    started = time.monotonic()
    try:
        result = await work
    except Exception as exc:
        report(time.monotonic() - started, exc)
        raise
    report(time.monotonic() - started, None)
    return result
