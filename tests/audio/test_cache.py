"""The audio cache (issue 12): decoded clips reused by the content of the audio, http(s) URLs revalidated.

Real parts throughout: a loopback origin (tests/origin.py) that records every request, the real fetcher and guard,
the real decoder workers; decodes are counted by a wrapper that passes each call on to the real pool.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from tests import corpus as C
from tests.audio import test_sources
from tests.audio.test_sources import fetcher
from tests.origin import Origin, Request, body, redirect, send
from ting import errors
from ting.audio import AudioCache, AudioLoader, AudioSources
from ting.audio.cache import ClipKey
from ting.audio.sources import Validators
from ting.types import AudioClip

MiB = 1024 * 1024
dials = test_sources.dials  # the tripwire fixture: any dial of a non-loopback address fails the test


@pytest.fixture
async def origin() -> Any:
    server = await Origin().start()
    yield server
    await server.close()


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Three different WAV files (a 10 s one is over the size hashed on the event loop)."""
    root = tmp_path_factory.mktemp("clips")
    return {
        name: C.write_wav(root / f"{name}.wav", C.tone(seconds, freq=freq)).read_bytes()
        for name, seconds, freq in (("a", 1.5, 440.0), ("b", 1.5, 660.0), ("long", 10.0, 330.0))
    }


class CountingPool:
    """The real decoder pool, with its decode calls counted."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.decodes = 0

    async def decode(self, data: bytes, **options: Any) -> AudioClip:
        self.decodes += 1
        return await self.pool.decode(data, **options)


class Store:
    """An upload store holding objects by key and owner (what store/files.py's read_object promises)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}
        self.reads = 0

    async def read_object(self, key: str, *, owner: str | None) -> bytes:
        self.reads += 1
        if (key, owner or "") not in self.objects:
            raise errors.DownloadFailed()
        return self.objects[(key, owner or "")]


@dataclass
class Setup:
    loader: AudioLoader
    pool: CountingPool
    store: Store = field(default_factory=Store)


@pytest.fixture
async def make(decoder_pool: Any) -> Any:
    """Build loaders over the shared real decoder pool; their fetchers are closed at the end."""
    made: list[AudioLoader] = []

    def build(cache_mib: float = 64, resolver: Any = None) -> Setup:
        pool = CountingPool(decoder_pool)
        store = Store()
        sources = AudioSources(fetcher(resolver=resolver), store, max_bytes=10 * MiB)
        loader = AudioLoader(sources, pool, AudioCache(int(cache_mib * MiB)))  # type: ignore[arg-type]
        made.append(loader)
        return Setup(loader, pool, store)

    yield build
    for loader in made:
        await loader.sources.fetcher.aclose()


def validated(state: dict[str, Any]) -> Any:
    """A route answering conditional GETs as an origin does: 304 when the validator sent matches the current one."""

    async def route(writer: asyncio.StreamWriter, request: Request) -> None:
        etag, modified = state.get("etag"), state.get("last_modified")
        headers = {k: v for k, v in (("ETag", etag), ("Last-Modified", modified)) if v}
        headers.update(state.get("headers", {}))
        if (etag and request.headers.get("if-none-match") == etag) or (
            not etag and modified and request.headers.get("if-modified-since") == modified
        ):
            await send(writer, 304, b"", headers)
        else:
            await send(writer, 200, state["data"], headers)

    return route


def same(a: AudioClip, b: AudioClip) -> bool:
    return np.array_equal(a.samples, b.samples) and (a.duration_s, a.codec) == (b.duration_s, b.codec)


# --- http(s) URLs ---------------------------------------------------------------------------------------------


async def test_an_etag_that_still_matches_is_neither_downloaded_nor_decoded_again(
    make: Any, origin: Origin, clips: dict[str, bytes], dials: list[str]
) -> None:
    s = make()
    origin.routes["/a.wav"] = validated({"data": clips["a"], "etag": '"v1"'})
    url = f"{origin.base}/a.wav"
    first = await s.loader.load(url)
    second = await s.loader.load(url)
    assert "if-none-match" not in origin.requests[0].headers
    assert origin.requests[1].headers["if-none-match"] == '"v1"'  # revalidated: one request each time
    assert len(origin.requests) == 2 and s.pool.decodes == 1
    assert same(first, second)
    stats = s.loader.cache_stats()
    assert (stats.hits, stats.misses, stats.not_modified, stats.entries, stats.urls) == (1, 1, 1, 1, 1)


async def test_last_modified_alone_revalidates(
    make: Any, origin: Origin, clips: dict[str, bytes], dials: list[str]
) -> None:
    s = make()
    modified = "Tue, 01 Dec 2026 10:00:00 GMT"
    origin.routes["/a.wav"] = validated({"data": clips["a"], "last_modified": modified})
    url = f"{origin.base}/a.wav"
    first = await s.loader.load(url)
    second = await s.loader.load(url)
    assert origin.requests[1].headers["if-modified-since"] == modified
    assert "if-none-match" not in origin.requests[1].headers
    assert s.pool.decodes == 1 and same(first, second)


async def test_a_changed_resource_gives_the_new_audio(
    make: Any, origin: Origin, clips: dict[str, bytes], dials: list[str]
) -> None:
    s = make()
    state: dict[str, Any] = {"data": clips["a"], "etag": '"v1"'}
    origin.routes["/a.wav"] = validated(state)
    url = f"{origin.base}/a.wav"
    old = await s.loader.load(url)
    state.update(data=clips["b"], etag='"v2"')  # the origin now has other audio under the same URL
    new = await s.loader.load(url)
    assert origin.requests[1].headers["if-none-match"] == '"v1"'
    assert not same(old, new)
    assert same(new, await s.pool.pool.decode(clips["b"]))  # what decoding the new bytes gives
    again = await s.loader.load(url)
    assert origin.requests[2].headers["if-none-match"] == '"v2"'
    assert same(again, new) and s.pool.decodes == 2  # a and b (the direct decode above is not counted)


@pytest.mark.parametrize("cache_control", ["no-store", "private, max-age=600", "max-age=60, No-Store"])
async def test_what_the_origin_says_not_to_store_is_downloaded_and_decoded_every_time(
    make: Any, origin: Origin, clips: dict[str, bytes], dials: list[str], cache_control: str
) -> None:
    s = make()
    origin.routes["/a.wav"] = validated(
        {"data": clips["a"], "etag": '"v1"', "headers": {"Cache-Control": cache_control}}
    )
    url = f"{origin.base}/a.wav"
    first = await s.loader.load(url)
    second = await s.loader.load(url)
    assert len(origin.requests) == 2
    assert all("if-none-match" not in r.headers for r in origin.requests)  # full downloads, nothing to revalidate
    assert s.pool.decodes == 2 and same(first, second)
    stats = s.loader.cache_stats()
    assert (stats.entries, stats.urls, stats.hits, stats.misses) == (0, 0, 0, 2)


async def test_vary_star_is_not_stored(make: Any, origin: Origin, clips: dict[str, bytes], dials: list[str]) -> None:
    s = make()
    origin.routes["/a.wav"] = validated({"data": clips["a"], "etag": '"v1"', "headers": {"Vary": "*"}})
    for _ in range(2):
        await s.loader.load(f"{origin.base}/a.wav")
    assert "if-none-match" not in origin.requests[1].headers and s.pool.decodes == 2


async def test_a_url_without_validators_is_downloaded_again_but_not_decoded_again(
    make: Any, origin: Origin, clips: dict[str, bytes], dials: list[str]
) -> None:
    s = make()
    origin.routes["/a.wav"] = body(clips["a"])  # no ETag, no Last-Modified: nothing to ask with
    for _ in range(2):
        await s.loader.load(f"{origin.base}/a.wav")
    assert len(origin.requests) == 2 and s.pool.decodes == 1  # the same bytes: the same clip


async def test_a_304_never_comes_to_a_request_that_did_not_ask(
    make: Any, origin: Origin, clips: dict[str, bytes], dials: list[str]
) -> None:
    s = make()
    origin.routes["/a.wav"] = body(b"", status=304)
    with pytest.raises(errors.DownloadFailed):
        await s.loader.load(f"{origin.base}/a.wav")


async def test_validators_go_only_to_the_hop_that_gave_them(
    make: Any, origin: Origin, clips: dict[str, bytes], dials: list[str]
) -> None:
    s = make()
    origin.routes["/a.wav"] = redirect("/b.wav")
    origin.routes["/b.wav"] = validated({"data": clips["a"], "etag": '"v1"'})
    for _ in range(2):
        await s.loader.load(f"{origin.base}/a.wav")
    assert [(r.path, r.headers.get("if-none-match")) for r in origin.requests] == [
        ("/a.wav", None),
        ("/b.wav", None),
        ("/a.wav", None),
        ("/b.wav", '"v1"'),
    ]
    assert s.pool.decodes == 1


async def test_the_guard_runs_on_every_request_for_a_cached_url(
    make: Any, origin: Origin, clips: dict[str, bytes], dials: list[str]
) -> None:
    answers = {"media.test": "127.0.0.1"}

    async def resolve(host: str, port: int) -> list[Any]:
        return [ipaddress.ip_address(answers[host])]

    s = make(resolver=resolve)
    origin.routes["/a.wav"] = validated({"data": clips["a"], "etag": '"v1"'})
    url = f"http://media.test:{origin.port}/a.wav"
    await s.loader.load(url)
    await s.loader.load(url)  # revalidated (304): the clip is kept and the URL's validators too
    assert s.loader.cache_stats().not_modified == 1
    answers["media.test"] = "10.0.0.7"  # the name now points inside: refused, cache or not
    with pytest.raises(errors.DestinationBlocked):
        await s.loader.load(url)
    answers["media.test"] = "127.0.0.1"
    origin.routes["/a.wav"] = redirect("http://169.254.169.254/latest/meta-data/")
    with pytest.raises(errors.DestinationBlocked):  # a cached URL that now redirects to the metadata service
        await s.loader.load(url)
    assert len(origin.requests) == 3 and s.pool.decodes == 1
    assert all(ipaddress.ip_address(d).is_loopback for d in dials)


async def test_api_keys_do_not_share_what_they_fetched(
    make: Any, origin: Origin, clips: dict[str, bytes], dials: list[str]
) -> None:
    s = make()
    origin.routes["/a.wav"] = validated({"data": clips["a"], "etag": '"v1"'})
    url = f"{origin.base}/a.wav"
    await s.loader.load(url, owner="alice")
    await s.loader.load(url, owner="bob")  # bob's first request: a full download and a decode of his own
    assert "if-none-match" not in origin.requests[1].headers and s.pool.decodes == 2
    await s.loader.load(url, owner="bob")
    assert origin.requests[2].headers["if-none-match"] == '"v1"' and s.pool.decodes == 2


# --- data: URIs and uploads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "long"])
async def test_a_data_uri_sent_again_is_decoded_once(make: Any, clips: dict[str, bytes], name: str) -> None:
    s = make()
    encoded = base64.b64encode(clips[name]).decode()
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))  # the same bytes, spelt otherwise
    first = await s.loader.load("data:audio/wav;base64," + encoded)
    second = await s.loader.load("data:;base64," + wrapped)
    assert s.pool.decodes == 1 and same(first, second)
    assert same(first, await s.pool.pool.decode(clips[name]))


async def test_an_upload_used_again_is_read_again_but_decoded_once(make: Any, clips: dict[str, bytes]) -> None:
    s = make()
    s.store.objects[("dashscope-instant/k/a.wav", "alice")] = clips["a"]
    source = "oss://dashscope-instant/k/a.wav"
    first = await s.loader.load(source, owner="alice")
    second = await s.loader.load(source, owner="alice")
    assert s.pool.decodes == 1 and same(first, second)
    assert s.store.reads == 2  # the store's owner and expiry checks run every time
    with pytest.raises(errors.DownloadFailed):
        await s.loader.load(source, owner="mallory")
    with pytest.raises(errors.OssNotResolved):
        await s.loader.load(source, owner="alice", oss_resolve=False)


async def test_concurrent_requests_for_one_clip_decode_it_once(make: Any, clips: dict[str, bytes]) -> None:
    s = make()
    uri = "data:;base64," + base64.b64encode(clips["a"]).decode()
    loaded = await asyncio.gather(*(s.loader.load(uri) for _ in range(4)))
    assert s.pool.decodes == 1 and all(same(c, loaded[0]) for c in loaded)


async def test_a_bad_file_is_not_kept(make: Any) -> None:
    s = make()
    uri = "data:;base64," + base64.b64encode(b"<html>not audio</html>").decode()
    for _ in range(2):
        with pytest.raises(errors.InvalidAudio):
            await s.loader.load(uri)
    assert s.pool.decodes == 2 and s.loader.cache_stats().entries == 0


async def test_the_decoding_limit_is_part_of_the_key(make: Any, clips: dict[str, bytes]) -> None:
    s = make()
    uri = "data:;base64," + base64.b64encode(clips["long"]).decode()
    whole = await s.loader.load(uri)
    cut = await s.loader.load(uri, max_seconds=2.0)
    assert s.pool.decodes == 2 and cut.truncated and cut.seconds == 2.0 and whole.seconds == 10.0


async def test_a_cache_of_zero_turns_it_all_off(
    make: Any, origin: Origin, clips: dict[str, bytes], dials: list[str]
) -> None:
    s = make(cache_mib=0)
    origin.routes["/a.wav"] = validated({"data": clips["a"], "etag": '"v1"'})
    uri = "data:;base64," + base64.b64encode(clips["a"]).decode()
    for _ in range(2):
        await s.loader.load(f"{origin.base}/a.wav")
        await s.loader.load(uri)
    assert all("if-none-match" not in r.headers for r in origin.requests)
    assert s.pool.decodes == 4
    stats = s.loader.cache_stats()
    assert (stats.entries, stats.urls, stats.capacity_bytes) == (0, 0, 0)


# --- the bound ------------------------------------------------------------------------------------------------


def clip(seconds: float, value: float = 0.0) -> AudioClip:
    samples = np.full(int(seconds * 16000), value, dtype=np.float32)
    return AudioClip(samples=samples, duration_s=seconds, truncated=False, container="wav", codec="pcm_s16le")


def key(n: int) -> ClipKey:
    return ClipKey("", n.to_bytes(32, "big"), 480_000)


def test_the_least_recently_used_clip_goes_first_and_the_bound_holds() -> None:
    cache = AudioCache(1 * MiB)
    each = clip(2.0).samples.nbytes + 512  # what one 2 s clip counts for
    fits = MiB // each
    assert fits == 8
    for n in range(fits):
        cache.put(key(n), clip(2.0, n / 10))
    assert cache.get(key(0)) is not None  # 0 is now the most recently used; 1 the least
    cache.put(key(fits), clip(2.0))
    assert cache.get(key(1)) is None and cache.get(key(0)) is not None
    stats = cache.stats()
    assert (stats.entries, stats.evictions, stats.size_bytes) == (fits, 1, fits * each)
    assert stats.size_bytes <= stats.capacity_bytes
    for n in range(100, 130):
        cache.put(key(n), clip(2.0))
        assert cache.stats().size_bytes <= MiB
    assert [cache.get(key(n)) is not None for n in (128, 129)] == [True, True]


def test_a_clip_over_an_eighth_of_the_cache_is_not_kept() -> None:
    cache = AudioCache(1 * MiB)
    cache.put(key(1), clip(2.0))
    cache.put(key(2), clip(3.0))  # 192 KiB of samples: more than 128 KiB
    assert cache.get(key(2)) is None and cache.get(key(1)) is not None


async def test_oversized_validators_are_not_remembered(
    make: Any, origin: Origin, clips: dict[str, bytes], dials: list[str]
) -> None:
    s = make()
    huge = '"' + "x" * 4000 + '"'  # an origin cannot make the URL map hold kilobytes per URL
    origin.routes["/a.wav"] = validated({"data": clips["a"], "etag": huge})
    for _ in range(2):
        await s.loader.load(f"{origin.base}/a.wav")
    assert "if-none-match" not in origin.requests[1].headers and s.pool.decodes == 1
    assert s.loader.cache_stats().urls == 0


def test_the_url_map_keeps_the_most_recently_used_urls() -> None:
    cache = AudioCache(1 * MiB, url_entries=2)
    cache.put(key(1), clip(1.0))
    for url in ("http://a/1", "http://a/2", "http://a/3"):
        cache.remember("", url, Validators(url, '"e"', None), key(1).digest)
    assert cache.recall("", "http://a/1", 480_000) is None
    assert [cache.recall("", u, 480_000) is not None for u in ("http://a/2", "http://a/3")] == [True, True]
    assert cache.recall("bob", "http://a/3", 480_000) is None  # another key's scope
    assert cache.stats().urls == 2
