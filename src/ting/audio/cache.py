"""Decoded clips reused by the content of the audio, and the validators of audio URLs (issue 12).

Every turn of a chat about one recording sends the recording again. The clip it decodes to is kept, keyed by a
SHA-256 of the audio bytes (and the decoding limit), in a least-recently-used map bounded in bytes; the bytes still
have to arrive (sent again, read again from the upload store, or downloaded again) before a clip is reused, so a
hit saves the decoding and nothing else is taken on trust. For an http(s) URL, what the origin said about its
answer (ETag, Last-Modified) is kept too: the next request for that URL is a conditional GET, and a 304 reuses the
clip without the body being downloaded. Both maps are scoped by the API key's owner: a recording sent with one key is
never found faster with another (no timing side channel between keys).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

from ting.audio.sources import Validators
from ting.types import AudioClip

MiB = 1024 * 1024
URL_ENTRIES = 1024  # URLs whose validators are kept (more than the clips 256 MiB holds: a URL is worth its clip)
MAX_URL_CHARS = 2048  # a longer URL (or redirect target), ETag or Last-Modified is not remembered: with these bounds
MAX_VALIDATOR_CHARS = 256  # the URL map takes at most ~5 MiB whatever origins send
CLIP_OVERHEAD_BYTES = 512  # what a kept clip costs besides its samples (key, dataclass, map entry)
HASH_INLINE_BYTES = 256 * 1024  # larger payloads are hashed on a thread (~1.3 ms per MiB)


@dataclass(frozen=True)
class ClipKey:
    """What a decoded clip depends on: the bytes (their SHA-256) and the decoding limit; `scope` keeps keys apart."""

    scope: str  # the API key's owner ("" on an open server)
    digest: bytes
    max_samples: int


@dataclass(frozen=True)
class Recalled:
    """A URL's validators together with the clip its last body decoded to (both still held)."""

    validators: Validators
    key: ClipKey
    clip: AudioClip


@dataclass(frozen=True)
class CacheStats:
    """Counters of the decoded-clip cache (for /health and metrics)."""

    hits: int  # clips reused instead of decoded (a 304 included)
    misses: int  # lookups that found nothing: the audio was decoded
    entries: int
    size_bytes: int
    capacity_bytes: int
    evictions: int
    not_modified: int  # conditional downloads the origin answered 304 (no body downloaded)
    urls: int  # URLs whose validators are kept


def digest_of(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def clip_bytes(clip: AudioClip) -> int:
    return int(clip.samples.nbytes) + CLIP_OVERHEAD_BYTES


def _small(url: str, validators: Validators) -> bool:
    return (
        len(url) <= MAX_URL_CHARS
        and len(validators.url) <= MAX_URL_CHARS
        and len(validators.etag or "") <= MAX_VALIDATOR_CHARS
        and len(validators.last_modified or "") <= MAX_VALIDATOR_CHARS
    )


class AudioCache:
    """Decoded clips by content (LRU, at most `capacity_bytes`) and URL validators (LRU, at most `url_entries`).

    A clip larger than an eighth of the capacity is not kept, so one clip cannot flush the others. `capacity_bytes`
    0 turns the cache off: nothing is kept and no download is conditional. Safe to use from several threads."""

    def __init__(self, capacity_bytes: int, *, url_entries: int = URL_ENTRIES) -> None:
        self.capacity_bytes = max(0, capacity_bytes)
        self.url_entries = url_entries
        self._clips: OrderedDict[ClipKey, AudioClip] = OrderedDict()
        self._urls: OrderedDict[tuple[str, str], tuple[Validators, bytes]] = OrderedDict()
        self._size_bytes = 0
        self._hits = self._misses = self._evictions = self._not_modified = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def get(self, key: ClipKey) -> AudioClip | None:
        """The clip kept under `key` (now the most recently used), counted as a hit or a miss."""
        with self._lock:
            clip = self._clips.get(key)
            if clip is None:
                self._misses += 1
                return None
            self._clips.move_to_end(key)
            self._hits += 1
            return clip

    def put(self, key: ClipKey, clip: AudioClip) -> None:
        size = clip_bytes(clip)
        if not self.enabled or size > self.capacity_bytes // 8:
            return
        with self._lock:
            old = self._clips.pop(key, None)
            if old is not None:
                self._size_bytes -= clip_bytes(old)
            self._clips[key] = clip
            self._size_bytes += size
            while self._size_bytes > self.capacity_bytes:
                _, evicted = self._clips.popitem(last=False)
                self._size_bytes -= clip_bytes(evicted)
                self._evictions += 1

    def recall(self, scope: str, url: str, max_samples: int) -> Recalled | None:
        """The validators `url` last answered with, if the clip its body decoded to is still kept."""
        with self._lock:
            known = self._urls.get((scope, url))
            if known is None:
                return None
            validators, digest = known
            key = ClipKey(scope, digest, max_samples)
            clip = self._clips.get(key)
            return None if clip is None else Recalled(validators, key, clip)

    def remember(self, scope: str, url: str, validators: Validators | None, digest: bytes) -> None:
        """Keep `url`'s validators with the digest of its body; None forgets the URL (no-store, or none sent), as
        does a URL or validator past the bounds above."""
        if not self.enabled:
            return
        with self._lock:
            if validators is None or not _small(url, validators):
                self._urls.pop((scope, url), None)
                return
            self._urls[(scope, url)] = (validators, digest)
            self._urls.move_to_end((scope, url))
            while len(self._urls) > self.url_entries:
                self._urls.popitem(last=False)

    def reuse(self, recalled: Recalled) -> AudioClip:
        """The origin answered 304: the recalled clip holds; it counts as a hit and is the most recently used."""
        with self._lock:
            self._not_modified += 1
            self._hits += 1
            if recalled.key in self._clips:
                self._clips.move_to_end(recalled.key)
        return recalled.clip

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                entries=len(self._clips),
                size_bytes=self._size_bytes,
                capacity_bytes=self.capacity_bytes,
                evictions=self._evictions,
                not_modified=self._not_modified,
                urls=len(self._urls),
            )
