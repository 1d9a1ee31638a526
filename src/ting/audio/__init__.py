"""What the user sent -> 16 kHz mono float32, or a precise error.

`AudioLoader` is the one entry point the service uses: it reads the bytes behind an audio reference
(sources.py, guarded by guard.py) and decodes them in isolated worker processes (decode.py), reusing the clip the
same bytes decoded to before (cache.py): an http(s) URL is downloaded again conditionally.
"""

from __future__ import annotations

import asyncio
import functools

from ting.audio.cache import HASH_INLINE_BYTES, AudioCache, CacheStats, ClipKey, digest_of
from ting.audio.decode import DecoderPool, sniff
from ting.audio.guard import MediaGuard
from ting.audio.observe import AudioObserver, source_kind, timed
from ting.audio.sources import (
    AudioSources,
    Download,
    HttpFetcher,
    ObjectStore,
    Resolver,
    is_url,
    parse_data_uri,
    system_resolver,
)
from ting.audio.tokens import audio_tokens, billed_audio_tokens
from ting.types import SAMPLE_RATE, WINDOW_S, AudioClip

__all__ = [
    "AudioCache",
    "AudioLoader",
    "AudioObserver",
    "AudioSources",
    "CacheStats",
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
    def __init__(
        self,
        sources: AudioSources,
        pool: DecoderPool,
        cache: AudioCache | None = None,
        observer: AudioObserver | None = None,
    ) -> None:
        self.sources = sources
        self.pool = pool
        self.cache = cache if cache is not None else AudioCache(0)
        self.observer = observer  # told how long each fetch and decode took, and what failed (the metrics)
        self._decoding: dict[ClipKey, asyncio.Future[AudioClip]] = {}  # one decode per clip at a time

    async def start(self) -> None:
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.close()
        await self.sources.fetcher.aclose()

    async def load(
        self, source: str, *, owner: str | None = None, oss_resolve: bool = True, max_seconds: float = WINDOW_S
    ) -> AudioClip:
        """Fetch and decode one audio reference (http(s) URL, data: URI or oss:// key), reusing the clip the same
        bytes decoded to before; an http(s) URL whose clip is kept is downloaded conditionally."""
        observer = self.observer
        fetched = None if observer is None else functools.partial(observer.fetched, source_kind(source))
        if not self.cache.enabled:
            data = await timed(self.sources.read(source, owner=owner, oss_resolve=oss_resolve), fetched)
            return await self.decode(data, max_seconds=max_seconds)
        scope, max_samples = owner or "", int(max_seconds * SAMPLE_RATE)
        recalled = self.cache.recall(scope, source, max_samples) if is_url(source) else None
        validators = recalled.validators if recalled is not None else None
        download = await timed(
            self.sources.fetch(source, owner=owner, oss_resolve=oss_resolve, validators=validators), fetched
        )
        if download.body is None:  # 304 Not Modified: only ever the answer to the validators sent
            assert recalled is not None
            self.cache.remember(scope, source, download.validators, recalled.key.digest)
            return self.cache.reuse(recalled)
        key = ClipKey(scope, await _digest(download.body), max_samples)
        if is_url(source):
            self.cache.remember(scope, source, download.validators, key.digest)
        return await self._decoded(key, download, max_seconds)

    async def decode(self, data: bytes, *, max_seconds: float = WINDOW_S, refuse_longer: bool = False) -> AudioClip:
        """Decode audio bytes the caller already holds (an uploaded recording; never cached); `refuse_longer`: a
        recording longer than `max_seconds` is refused before it is decoded, rather than cut."""
        decoded = None if self.observer is None else self.observer.decoded
        return await timed(self.pool.decode(data, max_seconds=max_seconds, refuse_longer=refuse_longer), decoded)

    async def _decoded(self, key: ClipKey, download: Download, max_seconds: float) -> AudioClip:
        """The clip `key` names: kept, being decoded for another request, or decoded now (and kept if the source
        allows). A request that gives up waiting does not stop the decode the others wait on."""
        clip = self.cache.get(key)
        if clip is not None:
            return clip
        job = self._decoding.get(key)
        if job is None:
            assert download.body is not None
            job = asyncio.ensure_future(self.decode(download.body, max_seconds=max_seconds))
            self._decoding[key] = job
            job.add_done_callback(lambda done: self._decode_done(key, done, keep=download.storable))
        return await asyncio.shield(job)

    def _decode_done(self, key: ClipKey, job: asyncio.Future[AudioClip], *, keep: bool) -> None:
        self._decoding.pop(key, None)
        if job.cancelled() or job.exception() is not None:
            return  # errors are not kept: the same bytes sent again are decoded again
        if keep:
            self.cache.put(key, job.result())

    def cache_stats(self) -> CacheStats:
        return self.cache.stats()


async def _digest(data: bytes) -> bytes:
    if len(data) > HASH_INLINE_BYTES:  # not on the event loop (hashlib releases the GIL)
        return await asyncio.to_thread(digest_of, data)
    return digest_of(data)
