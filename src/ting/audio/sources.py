"""Where audio bytes come from: http(s) downloads, data: URIs and oss:// keys of uploaded files.

This is the only module of Ting that makes outbound HTTP requests. Downloads are streamed and stop as soon
as the body passes the size limit; connect, idle-read and total timeouts apply; redirects are followed by
hand, at most 5 hops, each checked again by the guard; the connection goes to the address the guard
checked (Host header and TLS SNI keep the name). No proxy from the environment, no cookies, no credentials.

A download may be conditional (`fetch_conditional`): the validators of an earlier answer (ETag, Last-Modified)
are sent again on the hop they came from, and a 304 there means the earlier body still holds. Every conditional
request takes exactly the path of a plain one: guard, pinned address, limits, timeouts. What an answer allows a
cache to keep (`Cache-Control: no-store` or `private`, `Vary: *`: nothing) is read from its headers here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import ipaddress
import logging
import re
import socket
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import httpx

from ting.audio.guard import IPAddress, MediaGuard, Target
from ting.errors import (
    AudioEmpty,
    AudioTooLarge,
    ConnectionRefused,
    DataUriTooLarge,
    DownloadFailed,
    DownloadTimeout,
    InvalidDataUri,
    MediaUrlError,
    OssNotResolved,
    UnsupportedScheme,
)

log = logging.getLogger("ting.audio")

MAX_REDIRECTS = 5
READ_CHUNK_BYTES = 64 * 1024
DATA_URI_INLINE_CHARS = 256 * 1024  # larger data: URIs are decoded on a thread
_REDIRECTS = (301, 302, 303, 307, 308)
_BASE64_CHARS = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")

Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Resolve `host` with the system resolver (one lookup; the fetcher never repeats it)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise DownloadFailed() from None
    seen: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if ip not in seen:
            seen.append(ip)
    return seen


BAD_URL = "Invalid URL provided in your request (or in a redirect's Location header)."


def _redirect_target(base: httpx.URL, location: str) -> str:
    """The URL a redirect points to; a Location httpx cannot parse is the origin's error, a clear 400."""
    try:
        return str(base.join(location))
    except (httpx.InvalidURL, ValueError, TypeError):
        raise MediaUrlError(BAD_URL) from None


def _display_text(url: str) -> str:
    try:
        return _display(httpx.URL(url)) if url.startswith("http") else "audio"
    except (httpx.InvalidURL, ValueError, TypeError):
        return "audio"


def _display(url: httpx.URL) -> str:
    """The URL for error messages and logs: no query string (it may hold a signature)."""
    return str(url.copy_with(query=None, fragment=None))


@dataclass(frozen=True)
class Validators:
    """What a conditional request sends again: an answer's validators, and the URL that gave them (the last hop of
    its redirect chain; the conditional headers go only to that URL)."""

    url: str
    etag: str | None
    last_modified: str | None

    def headers(self) -> dict[str, str]:
        sent = {"If-None-Match": self.etag} if self.etag else {}
        if self.last_modified:
            sent["If-Modified-Since"] = self.last_modified
        return sent


@dataclass(frozen=True)
class Download:
    """The bytes behind an audio reference, and what a cache may keep of them."""

    body: bytes | None  # None: the origin answered 304 Not Modified to a conditional request
    storable: bool  # False: the origin said no-store or private (or Vary: *); nothing of it may be kept
    validators: Validators | None  # for the next conditional request; None: the answer gave none (or not storable)


# Cache-Control directives after which nothing of an answer may be kept: Ting's cache serves many API keys, so it
# keeps only what a shared cache may (RFC 9111 5.2.2.3 no-store, 5.2.2.7 private).
_NOT_STORABLE = frozenset({"no-store", "private"})


def _directives(value: str) -> set[str]:
    """Cache-Control directive names, lower case (`max-age=60, Private` -> {"max-age", "private"})."""
    return {part.split("=", 1)[0].strip().lower() for part in value.split(",") if part.strip()}


def _storable(headers: httpx.Headers) -> bool:
    cache_control = _directives(",".join(headers.get_list("cache-control")))
    vary = {v.strip() for v in ",".join(headers.get_list("vary")).split(",")}
    return not (cache_control & _NOT_STORABLE) and "*" not in vary


def _answer(url: str, headers: httpx.Headers, body: bytes | None, earlier: Validators | None = None) -> Download:
    """A 200's (or a 304's) download; a 304 that leaves a validator out keeps the earlier one (RFC 9111 4.3.4)."""
    if not _storable(headers):
        return Download(body, storable=False, validators=None)
    etag = headers.get("etag") or (earlier.etag if earlier else None)
    last_modified = headers.get("last-modified") or (earlier.last_modified if earlier else None)
    validators = Validators(url, etag, last_modified) if etag or last_modified else None
    return Download(body, storable=True, validators=validators)


class HttpFetcher:
    def __init__(
        self,
        guard: MediaGuard,
        *,
        max_bytes: int,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 10.0,
        total_timeout_s: float = 20.0,
        concurrency: int = 32,
        resolver: Resolver = system_resolver,
        verify: bool | str = True,
    ) -> None:
        self.guard = guard
        self.max_bytes = max_bytes
        self.total_timeout_s = total_timeout_s
        self.resolver = resolver
        self._slots = asyncio.Semaphore(concurrency)
        self._client = httpx.AsyncClient(
            trust_env=False,
            follow_redirects=False,
            verify=verify,
            timeout=httpx.Timeout(
                connect=connect_timeout_s, read=read_timeout_s, write=read_timeout_s, pool=total_timeout_s
            ),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=0),
            headers={"User-Agent": "ting-media-fetcher/0.1", "Accept": "*/*", "Accept-Encoding": "identity"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str) -> bytes:
        """Download `url` (following redirects) or raise a MediaUrlError / AudioTooLarge."""
        download = await self.fetch_conditional(url, None)
        assert download.body is not None  # no validators sent: a 304 is an error like any other status
        return download.body

    async def fetch_conditional(self, url: str, validators: Validators | None) -> Download:
        """Download `url` as `fetch` does; with `validators`, the hop at `validators.url` is a conditional GET and
        its 304 comes back as a Download without a body. Guard, pinning, limits and timeouts are fetch's own."""
        async with self._slots:
            current = url
            try:
                async with asyncio.timeout(self.total_timeout_s):
                    for _hop in range(MAX_REDIRECTS + 1):
                        target = self.guard.check_url(current)
                        address = await self._checked_address(target)
                        same = validators is not None and validators.url == str(target.url)
                        condition = validators if same else None
                        result = await self._get(target, address, condition)
                        if isinstance(result, Download):
                            return result
                        current = result
                    raise DownloadFailed("Failed to download multimodal content: too many redirects.")
            except TimeoutError:
                shown = _display_text(current)
                raise DownloadTimeout(f"Download {shown} timeout, please check network connection.") from None

    async def _checked_address(self, target: Target) -> IPAddress:
        resolved = [target.ip] if target.ip is not None else await self.resolver(target.host, target.port)
        return self.guard.pick_address(target, resolved)

    async def _get(self, target: Target, address: IPAddress, condition: Validators | None = None) -> Download | str:
        """One hop: the download (with `condition`, a 304 is one without a body), or the next URL when the answer
        is a redirect."""
        try:
            shown = _display(target.url)
            pinned = target.url.copy_with(host=str(address))
        except (httpx.InvalidURL, ValueError, TypeError):  # a URL (or redirect Location) httpx parses but cannot send
            raise MediaUrlError(BAD_URL) from None
        host_header = target.host if target.url.port is None else f"{target.host}:{target.port}"
        if ":" in target.host and target.ip is not None:  # IPv6 literal
            host_header = f"[{target.host}]" + (f":{target.port}" if target.url.port else "")
        extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
        headers = {"Host": host_header, **(condition.headers() if condition is not None else {})}
        request = self._client.build_request("GET", pinned, headers=headers, extensions=extensions)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException:
            raise DownloadTimeout(f"Download {shown} timeout, please check network connection.") from None
        except httpx.InvalidURL:  # not an HTTPError: httpx parses a redirect's Location inside send()
            log.info("audio download failed: %s sent a redirect httpx cannot parse", shown)
            raise MediaUrlError(BAD_URL) from None
        except httpx.ConnectError as exc:
            if _refused(exc):
                raise ConnectionRefused(f"Connection to {shown} refused, please provide available URL.") from None
            log.info("audio download failed: %s (%s)", shown, type(exc).__name__)
            raise DownloadFailed() from None
        except httpx.HTTPError as exc:
            log.info("audio download failed: %s (%s)", shown, type(exc).__name__)
            raise DownloadFailed() from None
        try:
            if response.status_code in _REDIRECTS and "location" in response.headers:
                return _redirect_target(target.url, response.headers["location"])
            if response.status_code == 304 and condition is not None:
                return _answer(condition.url, response.headers, None, condition)
            if response.status_code != 200:
                log.info("audio download failed: %s answered %d", shown, response.status_code)
                raise DownloadFailed()
            body = await self._read_body(response, shown)
            return _answer(str(target.url), response.headers, body)
        finally:
            await response.aclose()

    async def _read_body(self, response: httpx.Response, shown: str) -> bytes:
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise AudioTooLarge()
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        inflate: zlib._Decompress | None = None
        if encoding in ("gzip", "x-gzip"):
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            inflate = zlib.decompressobj()
        elif encoding not in ("identity", ""):
            log.info("audio download refused: %s sent content-encoding %s", shown, encoding)
            raise DownloadFailed()
        body = bytearray()
        try:
            async for chunk in response.aiter_raw(READ_CHUNK_BYTES):
                if inflate is None:
                    body += chunk
                else:  # count inflated bytes, and never inflate more than the limit allows
                    data = chunk
                    while data:
                        body += inflate.decompress(data, self.max_bytes + 1 - len(body))
                        data = inflate.unconsumed_tail
                        if len(body) > self.max_bytes:
                            break
                if len(body) > self.max_bytes:
                    raise AudioTooLarge()
        except httpx.TimeoutException:
            raise DownloadTimeout(f"Download {shown} timeout, please check network connection.") from None
        except (httpx.HTTPError, zlib.error):
            raise DownloadFailed() from None
        return bytes(body)


def _refused(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError) or getattr(cause, "errno", None) == errno.ECONNREFUSED:
            return True
        if "refused" in str(cause).lower():
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def parse_data_uri(uri: str, *, max_bytes: int) -> bytes:
    """The bytes of a `data:[<mime>][;param]...;base64,<payload>` URI.

    The encoded payload may be at most `max_bytes` characters (checked before decoding). ASCII whitespace
    in the payload is ignored and missing `=` padding is restored; anything else outside the standard
    base64 alphabet is an error.
    """
    if not uri[:5].lower() == "data:":
        raise InvalidDataUri()
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise InvalidDataUri()
    if len(payload) > max_bytes:
        raise DataUriTooLarge(f"Exceeded limit on max bytes per data-uri item : {max_bytes}")
    params = [p.strip().lower() for p in header.split(";")]
    if len(params) < 2 or params[-1] != "base64":
        raise InvalidDataUri(
            "The data URI is invalid: only base64 data URIs are accepted (data:[<mime>];base64,<payload>)."
        )
    try:  # the usual payload: plain base64, padded (the alphabet and padding are checked by b64decode itself)
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        data = _lenient_base64(payload)
    if not data:
        raise AudioEmpty()
    return data


def _lenient_base64(payload: str) -> bytes:
    """Base64 with ASCII whitespace anywhere and `=` padding missing, as browsers and some SDKs send it."""
    raw = "".join(payload.split()).encode("ascii", "replace")
    if len(raw) % 4 == 1 or not _BASE64_CHARS.match(raw):
        raise InvalidDataUri("The data URI is invalid: its payload is not valid base64.")
    raw += b"=" * (-len(raw) % 4)
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidDataUri("The data URI is invalid: its payload is not valid base64.") from None


class ObjectStore(Protocol):
    """Where oss:// keys live: the file store behind Ting's DashScope upload flow."""

    async def read_object(self, key: str, *, owner: str | None) -> bytes:
        """The bytes stored under `key`, if `owner` uploaded them; raise DownloadFailed otherwise."""
        ...


class AudioSources:
    """Turns an audio reference (http(s) URL, data: URI, oss:// key) into bytes."""

    def __init__(self, fetcher: HttpFetcher, store: ObjectStore | None, *, max_bytes: int) -> None:
        self.fetcher = fetcher
        self.store = store
        self.max_bytes = max_bytes

    async def read(self, source: str, *, owner: str | None = None, oss_resolve: bool = True) -> bytes:
        download = await self.fetch(source, owner=owner, oss_resolve=oss_resolve)
        assert download.body is not None  # no validators sent
        return download.body

    async def fetch(
        self, source: str, *, owner: str | None = None, oss_resolve: bool = True, validators: Validators | None = None
    ) -> Download:
        """The bytes behind `source`, with what a cache may keep of them. `validators` (http(s) only) make the
        download conditional: a Download without a body means the origin said the earlier bytes still hold."""
        if is_url(source):
            download = await self.fetcher.fetch_conditional(source, validators)
            if download.body is not None:
                _check_size(download.body, self.max_bytes)
            return download
        data = await self._read_other(source, owner=owner, oss_resolve=oss_resolve)
        _check_size(data, self.max_bytes)
        return Download(data, storable=True, validators=None)

    async def _read_other(self, source: str, *, owner: str | None, oss_resolve: bool) -> bytes:
        scheme = source.split(":", 1)[0].lower() if ":" in source else ""
        if scheme == "data":
            if len(source) > DATA_URI_INLINE_CHARS:  # ~20 ms per MiB: not on the event loop (bench/placement.py)
                data = await asyncio.to_thread(parse_data_uri, source, max_bytes=self.max_bytes)
            else:
                data = parse_data_uri(source, max_bytes=self.max_bytes)
        elif scheme == "oss":
            if not oss_resolve:
                raise OssNotResolved()
            if self.store is None:
                raise UnsupportedScheme()
            key = source[len("oss://") :]
            if not key:
                raise MediaUrlError()
            data = await self.store.read_object(key, owner=owner)
        elif not source.strip():
            raise AudioEmpty()
        else:
            raise UnsupportedScheme()
        return data


def is_url(source: str) -> bool:
    """Whether `source` is an http(s) URL (the references downloaded by HttpFetcher)."""
    return source.split(":", 1)[0].lower() in ("http", "https") if ":" in source else False


def _check_size(data: bytes, max_bytes: int) -> None:
    if not data:
        raise AudioEmpty()
    if len(data) > max_bytes:
        raise AudioTooLarge()
