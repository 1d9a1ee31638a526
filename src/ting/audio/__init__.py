"""What the user sent -> 16 kHz mono float32, or a precise error.

`AudioLoader` is the one entry point the service uses: it reads the bytes behind an audio reference
(sources.py, guarded by guard.py) and decodes them in isolated worker processes (decode.py).
"""

from __future__ import annotations

import functools

from ting.audio.decode import DecoderPool, sniff
from ting.audio.guard import MediaGuard
from ting.audio.observe import AudioObserver, source_kind, timed
from ting.audio.sources import (
    AudioSources,
    HttpFetcher,
    ObjectStore,
    Resolver,
    parse_data_uri,
    system_resolver,
)
from ting.audio.tokens import audio_tokens, billed_audio_tokens
from ting.types import WINDOW_S, AudioClip

__all__ = [
    "AudioLoader",
    "AudioObserver",
    "AudioSources",
    "DecoderPool",
    "HttpFetcher",
    "MediaGuard",
    "ObjectStore",
    "Resolver",
    "audio_tokens",
    "billed_audio_tokens",
    "parse_data_uri",
    "sniff",
    "system_resolver",
]


class AudioLoader:
    def __init__(self, sources: AudioSources, pool: DecoderPool, observer: AudioObserver | None = None) -> None:
        self.sources = sources
        self.pool = pool
        self.observer = observer  # told how long each fetch and decode took, and what failed (the metrics)

    async def start(self) -> None:
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.close()
        await self.sources.fetcher.aclose()

    async def load(
        self, source: str, *, owner: str | None = None, oss_resolve: bool = True, max_seconds: float = WINDOW_S
    ) -> AudioClip:
        """Fetch and decode one audio reference (http(s) URL, data: URI or oss:// key)."""
        observer = self.observer
        fetched = None if observer is None else functools.partial(observer.fetched, source_kind(source))
        data = await timed(self.sources.read(source, owner=owner, oss_resolve=oss_resolve), fetched)
        return await self.decode(data, max_seconds=max_seconds)

    async def decode(self, data: bytes, *, max_seconds: float = WINDOW_S, refuse_longer: bool = False) -> AudioClip:
        """Decode audio bytes the caller already holds (an uploaded recording); `refuse_longer`: a recording
        longer than `max_seconds` is refused before it is decoded, rather than cut."""
        decoded = None if self.observer is None else self.observer.decoded
        return await timed(self.pool.decode(data, max_seconds=max_seconds, refuse_longer=refuse_longer), decoded)
