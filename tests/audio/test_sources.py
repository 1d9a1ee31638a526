"""Audio sources: data URIs, and downloads against a misbehaving origin on 127.0.0.1.

A tripwire on socket.connect fails any test that dials an address other than loopback, so every refusal
below is proven to happen before a connection is made.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import ipaddress
import socket
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.origin import Origin, Request, body, redirect
from ting import errors
from ting.audio.guard import MediaGuard
from ting.audio.sources import AudioSources, HttpFetcher, parse_data_uri

MiB = 1024 * 1024

# --- data URIs -------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    payload=st.binary(min_size=1, max_size=3000),
    mime=st.sampled_from(["", "audio/wav", "audio/mpeg", "application/octet-stream", "audio/wav;codecs=1"]),
    wrap=st.booleans(),
    strip_padding=st.booleans(),
)
def test_property_data_uri_round_trip(payload: bytes, mime: str, wrap: bool, strip_padding: bool) -> None:
    encoded = base64.b64encode(payload).decode()
    if strip_padding:
        encoded = encoded.rstrip("=")
    if wrap:  # MIME-style line breaks are tolerated
        encoded = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    assert parse_data_uri(f"data:{mime};base64,{encoded}", max_bytes=MiB) == payload


def test_the_sdk_form_with_an_empty_media_type() -> None:
    assert parse_data_uri("data:;base64,UklGRg==", max_bytes=MiB) == b"RIFF"
    assert parse_data_uri("DATA:AUDIO/WAV;BASE64,UklGRg==", max_bytes=MiB) == b"RIFF"


def test_the_size_limit_is_on_the_encoded_string_and_checked_before_decoding() -> None:
    limit = 10 * MiB
    at_limit = "A" * limit  # decodes to 7.5 MiB of zeros
    assert len(parse_data_uri("data:;base64," + at_limit, max_bytes=limit)) == limit // 4 * 3
    with pytest.raises(errors.DataUriTooLarge) as info:
        parse_data_uri("data:;base64," + at_limit + "AAAA", max_bytes=limit)
    assert info.value.message == "Exceeded limit on max bytes per data-uri item : 10485760"
    with pytest.raises(errors.DataUriTooLarge):  # 200 MB: refused from its length alone
        parse_data_uri("data:;base64," + "!" * (200 * 1000 * 1000), max_bytes=limit)


@pytest.mark.parametrize(
    "uri",
    [
        "data:audio/wav,rawbytes",  # not base64
        "data:audio/wav;base64",  # no comma
        "data:;base64,UklGR!==",  # outside the alphabet
        "data:;base64,Ukl=GRg=",  # padding in the middle
        "data:;base64,UklGRg-_",  # URL-safe alphabet
        "data:;base64,U",  # impossible length
        "data:text/html;charset=utf-8,<b>hi</b>",
        "data:;base64,UklGRg===",
    ],
)
def test_malformed_data_uris_are_refused(uri: str) -> None:
    with pytest.raises(errors.InvalidDataUri):
        parse_data_uri(uri, max_bytes=MiB)


def test_an_empty_data_uri_is_empty_audio() -> None:
    with pytest.raises(errors.AudioEmpty):
        parse_data_uri("data:;base64,", max_bytes=MiB)


# --- downloads -------------------------------------------------------------------------------------------------


@pytest.fixture
def dials(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every address a socket connects to; a non-loopback one fails the test on the spot."""
    seen: list[str] = []
    real_connect = socket.socket.connect

    def tripwire(sock: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else str(address)
        seen.append(host)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not ipaddress.ip_address(host).is_loopback:
            raise AssertionError(f"tripwire: dialled {host}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", tripwire)
    return seen


@pytest.fixture
async def origin() -> Origin:
    server = await Origin().start()
    yield server
    await server.close()


def fetcher(allow: tuple[str, ...] = ("127.0.0.1",), resolver=None, **kw) -> HttpFetcher:  # type: ignore[no-untyped-def]
    options = dict(max_bytes=10 * MiB, connect_timeout_s=2.0, read_timeout_s=2.0, total_timeout_s=5.0)
    options.update(kw)
    if resolver is not None:
        options["resolver"] = resolver
    return HttpFetcher(MediaGuard(allow), **options)


def fake_resolver(answers: dict[str, list[str]], calls: list[str] | None = None):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list:
        if calls is not None:
            calls.append(host)
        if host not in answers:
            raise errors.DownloadFailed()
        return [ipaddress.ip_address(a) for a in answers[host]]

    return resolve


async def test_a_plain_download(origin: Origin, dials: list[str]) -> None:
    origin.routes["/a.wav"] = body(b"RIFF-audio-bytes")
    f = fetcher()
    assert await f.fetch(f"{origin.base}/a.wav?X-Amz-Signature=secret") == b"RIFF-audio-bytes"
    headers = origin.requests[0].headers
    assert headers["accept-encoding"] == "identity"
    assert "authorization" not in headers and "cookie" not in headers
    await f.aclose()


async def test_loopback_is_refused_before_any_connection(origin: Origin, dials: list[str]) -> None:
    origin.routes["/a.wav"] = body(b"secret")
    f = fetcher(allow=())
    with pytest.raises(errors.DestinationBlocked):
        await f.fetch(f"{origin.base}/a.wav")
    assert dials == [] and origin.requests == []
    await f.aclose()


async def test_the_connection_goes_to_the_checked_address_with_the_name_kept(origin: Origin, dials: list[str]) -> None:
    """DNS rebinding: the name is looked up once per hop, and that answer is the address dialled."""
    calls: list[str] = []
    answers = {"media.test": ["127.0.0.1"]}
    origin.routes["/a.wav"] = body(b"pinned")

    async def rebinding(host: str, port: int) -> list:
        calls.append(host)
        result = [ipaddress.ip_address(a) for a in answers[host]]
        answers[host] = ["10.9.9.9"]  # any second look-up would now answer an internal address
        return result

    f = fetcher(allow=("127.0.0.1",), resolver=rebinding)
    assert await f.fetch(f"http://media.test:{origin.port}/a.wav") == b"pinned"
    assert calls == ["media.test"]
    assert dials == ["127.0.0.1"]
    assert origin.requests[0].headers["host"] == f"media.test:{origin.port}"
    await f.aclose()


@pytest.mark.parametrize("answer", [["10.1.2.3"], ["169.254.169.254"], ["8.8.8.8", "127.0.0.1"], ["fd00::1"]])
async def test_a_name_resolving_inside_is_refused_before_any_connection(answer: list[str], dials: list[str]) -> None:
    f = fetcher(allow=(), resolver=fake_resolver({"media.test": answer}))
    with pytest.raises(errors.DestinationBlocked):
        await f.fetch("http://media.test/a.wav")
    assert dials == []
    await f.aclose()


async def test_redirects_are_checked_hop_by_hop(origin: Origin, dials: list[str]) -> None:
    origin.routes["/to-metadata"] = redirect("http://169.254.169.254/latest/meta-data/")
    origin.routes["/to-file"] = redirect("file:///etc/passwd")
    origin.routes["/to-gopher"] = redirect("gopher://127.0.0.1:70/")
    origin.routes["/relative"] = redirect("/final.wav", status=307)
    origin.routes["/final.wav"] = body(b"final")
    f = fetcher()
    with pytest.raises(errors.DestinationBlocked):
        await f.fetch(f"{origin.base}/to-metadata")
    with pytest.raises(errors.UnsupportedScheme):
        await f.fetch(f"{origin.base}/to-file")
    with pytest.raises(errors.UnsupportedScheme):
        await f.fetch(f"{origin.base}/to-gopher")
    assert await f.fetch(f"{origin.base}/relative") == b"final"
    assert set(dials) == {"127.0.0.1"}
    await f.aclose()


async def test_at_most_five_redirects_and_no_loops(origin: Origin, dials: list[str]) -> None:
    for i in range(7):
        origin.routes[f"/hop{i}"] = redirect(f"/hop{i + 1}")
    origin.routes["/hop5"] = body(b"five hops")
    origin.routes["/loop"] = redirect("/loop")
    f = fetcher()
    assert await f.fetch(f"{origin.base}/hop0") == b"five hops"
    origin.routes["/hop6"] = body(b"six hops")
    origin.routes["/hop5"] = redirect("/hop6")
    with pytest.raises(errors.DownloadFailed, match="too many redirects"):
        await f.fetch(f"{origin.base}/hop0")
    with pytest.raises(errors.DownloadFailed, match="too many redirects"):
        await f.fetch(f"{origin.base}/loop")
    await f.aclose()


async def test_a_declared_oversize_body_is_refused_from_the_headers(origin: Origin, dials: list[str]) -> None:
    async def huge(writer: asyncio.StreamWriter, request: Request) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 11000000\r\n\r\n" + bytes(1000))
        await writer.drain()
        await asyncio.sleep(30)  # never sends the rest

    origin.routes["/huge"] = huge
    f = fetcher()
    with pytest.raises(errors.AudioTooLarge):
        await f.fetch(f"{origin.base}/huge")
    await f.aclose()


async def test_an_undeclared_oversize_body_stops_at_the_limit(origin: Origin, dials: list[str]) -> None:
    sent = 0

    async def chunked(writer: asyncio.StreamWriter, request: Request) -> None:
        nonlocal sent
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = bytes(64 * 1024)
        for _ in range(50 * 16):  # 50 MiB offered
            writer.write(b"10000\r\n" + chunk + b"\r\n")
            sent += len(chunk)
            await writer.drain()

    origin.routes["/stream"] = chunked
    f = fetcher(max_bytes=1 * MiB)
    with pytest.raises(errors.AudioTooLarge):
        await f.fetch(f"{origin.base}/stream")
    await asyncio.sleep(0.1)
    assert sent < 10 * MiB  # the reader hung up long before the origin was done
    await f.aclose()


async def test_a_gzip_bomb_is_counted_inflated(origin: Origin, dials: list[str]) -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(MiB)
    bomb = b"".join(packer.compress(zeros) for _ in range(200)) + packer.flush()  # 200 MiB inflated
    assert len(bomb) < MiB
    origin.routes["/bomb"] = body(bomb, {"Content-Encoding": "gzip"})
    origin.routes["/small"] = body(gzip.compress(b"RIFF small"), {"Content-Encoding": "gzip"})
    origin.routes["/br"] = body(b"xx", {"Content-Encoding": "br"})
    f = fetcher(max_bytes=2 * MiB)
    with pytest.raises(errors.AudioTooLarge):
        await f.fetch(f"{origin.base}/bomb")
    assert await f.fetch(f"{origin.base}/small") == b"RIFF small"
    with pytest.raises(errors.DownloadFailed):
        await f.fetch(f"{origin.base}/br")
    await f.aclose()


async def test_slow_origins_hit_their_deadlines(origin: Origin, dials: list[str]) -> None:
    async def silent(writer: asyncio.StreamWriter, request: Request) -> None:
        await asyncio.sleep(30)

    async def drip(writer: asyncio.StreamWriter, request: Request) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.2)  # always under the idle timeout, never done

    origin.routes["/silent"] = silent
    origin.routes["/drip"] = drip
    f = fetcher(read_timeout_s=0.5, total_timeout_s=1.5)
    with pytest.raises(errors.DownloadTimeout) as info:
        await f.fetch(f"{origin.base}/silent?token=secret")
    assert info.value.code == "InvalidURL.Timeout"
    assert info.value.message == f"Download {origin.base}/silent timeout, please check network connection."
    with pytest.raises(errors.DownloadTimeout):
        await f.fetch(f"{origin.base}/drip")
    await f.aclose()


async def test_refused_missing_and_unresolvable(origin: Origin, dials: list[str]) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    f = fetcher(resolver=fake_resolver({}))
    with pytest.raises(errors.ConnectionRefused) as info:
        await f.fetch(f"http://127.0.0.1:{port}/a.wav")
    assert info.value.code == "InvalidURL.ConnectionRefused"
    with pytest.raises(errors.DownloadFailed) as failed:
        await f.fetch(f"{origin.base}/missing.wav")
    assert failed.value.message == "Failed to download multimodal content"
    assert "not found" not in failed.value.message  # the origin's body is never echoed
    with pytest.raises(errors.DownloadFailed):
        await f.fetch("http://no-such-host.test/a.wav")
    await f.aclose()


async def test_proxies_from_the_environment_are_ignored(
    origin: Origin, dials: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    origin.routes["/a.wav"] = body(b"direct")
    f = fetcher()
    assert await f.fetch(f"{origin.base}/a.wav") == b"direct"
    await f.aclose()


async def test_audio_sources_dispatch_on_the_scheme(origin: Origin, dials: list[str]) -> None:
    class Store:
        async def read_object(self, key: str, *, owner: str | None) -> bytes:
            if key == "dashscope-instant/k/a.wav" and owner == "alice":
                return b"RIFF stored"
            raise errors.DownloadFailed()

    origin.routes["/a.wav"] = body(b"RIFF fetched")
    sources = AudioSources(fetcher(), Store(), max_bytes=MiB)
    assert await sources.read(f"{origin.base}/a.wav") == b"RIFF fetched"
    assert await sources.read("data:;base64,UklGRg==") == b"RIFF"
    assert await sources.read("oss://dashscope-instant/k/a.wav", owner="alice") == b"RIFF stored"
    with pytest.raises(errors.DownloadFailed):
        await sources.read("oss://dashscope-instant/k/a.wav", owner="mallory")
    with pytest.raises(errors.OssNotResolved):
        await sources.read("oss://dashscope-instant/k/a.wav", owner="alice", oss_resolve=False)
    for bad in ("file:///etc/passwd", "/etc/passwd", "ftp://x/a.wav", "s3://bucket/a.wav"):
        with pytest.raises(errors.UnsupportedScheme):
            await sources.read(bad)
    with pytest.raises(errors.AudioEmpty):
        await sources.read("")
    await sources.fetcher.aclose()
