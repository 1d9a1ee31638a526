"""A live Ting server for the API tests: the real app, real HTTP on 127.0.0.1, the tiny checkpoint."""

from __future__ import annotations

import asyncio
import functools
import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from tests import corpus as C
from ting.api.app import create_app
from ting.api.runtime import Runtime
from ting.config import Settings


class LiveServer:
    """uvicorn on a loopback socket, in a thread of its own."""

    def __init__(self, settings: Settings, engine: Any = None, runtime: Runtime | None = None) -> None:
        self.settings = settings
        self.runtime = runtime or Runtime(settings, engine=engine)
        self.app = create_app(settings, self.runtime)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._server = uvicorn.Server(
            uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        )
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dashscope_base(self) -> str:
        return f"{self.url}/api/v1"

    def start(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(15)

    def run(self, coro: Any) -> Any:
        """Run a coroutine on the server's event loop (e.g. to create keys in its store)."""
        assert self.runtime.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.runtime.loop).result(30)


@contextmanager
def live_server(engine: Any, home: Path, **overrides: Any) -> Iterator[LiveServer]:
    options: dict[str, Any] = dict(
        model="qwen2-audio-tiny", home=str(home), allow_media_hosts=("127.0.0.1",), decode_workers=2, heartbeat_s=15.0
    )
    options.update(overrides)
    server = LiveServer(Settings(**options), engine)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """An open server (no key configured): any bearer token is accepted."""
    with live_server(engine, tmp_path_factory.mktemp("home")) as s:
        yield s


class MediaHost:
    """Serves files over HTTP on 127.0.0.1 (the 'public URL' of the hosted API's examples)."""

    def __init__(self, root: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(root))
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self._httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def media(corpus: dict[str, C.Sample], tmp_path_factory: pytest.TempPathFactory) -> Iterator[MediaHost]:
    root = tmp_path_factory.mktemp("media")
    for name, sample in corpus.items():
        (root / name).write_bytes(sample.path.read_bytes())
    (root / "welcome.mp3").write_bytes(corpus["mp3_cbr_zh"].path.read_bytes())
    (root / "not-audio.html").write_bytes(b"<html>nope</html>")
    host = MediaHost(root)
    yield host
    host.close()


def post(
    server: LiveServer,
    body: Any,
    *,
    stream: bool = False,
    token: str | None = "sk-test",
    headers: dict[str, str] | None = None,
    path: str = "/api/v1/services/aigc/multimodal-generation/generation",
    timeout: float = 60,
) -> httpx.Response:
    all_headers = {"Content-Type": "application/json"}
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    if stream:
        all_headers["X-DashScope-SSE"] = "enable"
    all_headers.update(headers or {})
    content = body if isinstance(body, (bytes, str)) else None
    return httpx.post(
        server.url + path,
        json=None if content is not None else body,
        content=content,
        headers=all_headers,
        timeout=timeout,
    )


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Wait until `condition()` holds (a generous deadline: a busy machine is slow, never wrong)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def hang_up_when(request: httpx.Request, condition: Callable[[], bool], what: str) -> None:
    """Send `request` on a socket of its own, wait until `condition()` holds, then hang up without reading."""
    body = request.read()
    head = f"{request.method} {request.url.raw_path.decode()} HTTP/1.1\r\n"
    head += "".join(f"{k.decode()}: {v.decode()}\r\n" for k, v in request.headers.raw) + "\r\n"
    port = request.url.port
    assert request.url.host and port is not None
    with socket.create_connection((request.url.host, port)) as sock:
        sock.sendall(head.encode() + body)
        wait_for(condition, what)
