"""Idle, slow and surplus connections (issue 9 item 6): raw sockets against the app on uvicorn, configured the
way `ting serve` configures it (ting.api.connections.uvicorn_options)."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from tests.api.conftest import LiveServer
from ting.api.connections import uvicorn_options
from ting.config import Settings

DEADLINE_S = 60.0  # generous: the server's own timeouts are a second or two


class GuardedServer(LiveServer):
    """LiveServer, but on `ting serve`'s uvicorn options (the guarded protocol, its timeouts and limits)."""

    def __init__(self, settings: Settings, engine: Any) -> None:
        super().__init__(settings, engine)
        config = uvicorn.Config(self.app, **uvicorn_options(settings))
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def connections(self) -> int:
        return len(self._server.server_state.connections)


def serve(engine: Any, home: Path, **overrides: Any) -> GuardedServer:
    options: dict[str, Any] = dict(
        model="qwen2-audio-tiny",
        home=str(home),
        header_timeout_s=1.5,
        body_timeout_s=1.5,
        keep_alive_s=1.0,
        max_connections=50,
    )
    options.update(overrides)
    return GuardedServer(Settings(**options), engine).start()


@pytest.fixture(scope="module")
def guarded(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuardedServer]:
    server = serve(engine, tmp_path_factory.mktemp("home"))
    yield server
    server.stop()


def connect(server: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or DEADLINE_S passes: then the test fails)."""
    data = b""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the server kept the connection open for {DEADLINE_S} s; it sent {data[:200]!r}")


def test_an_idle_connection_is_closed(guarded: GuardedServer) -> None:
    with connect(guarded) as sock:
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_a_slowloris_header_sender_is_cut_off(guarded: GuardedServer) -> None:
    """Headers a byte at a time: each byte is news, but the whole header has one deadline."""
    sent = 0
    with connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        deadline = time.monotonic() + DEADLINE_S
        closed = False
        while time.monotonic() < deadline and not closed:
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable:
                closed = True
                break
            try:
                sock.sendall(b"a")
                sent += 1
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed, "the slow header was never cut off"
        answer = read_until_closed(sock)
    assert sent >= 1 and answer.startswith(b"HTTP/1.1 408 ")


def test_a_stalled_request_body_is_cut_off(guarded: GuardedServer) -> None:
    with connect(guarded) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"model": "qwen'
        )
        answer = read_until_closed(sock)
    assert b" 200 " not in answer[:20]


def test_keep_alive_and_ordinary_requests_still_work(guarded: GuardedServer) -> None:
    with httpx.Client(base_url=guarded.url, timeout=60) as client:
        for _ in range(3):  # one connection, reused
            r = client.post(
                "/v1/chat/completions",
                json={"model": "qwen-audio-turbo", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 200, r.text


def test_connections_past_the_limit_are_refused_at_once(engine: Any, tmp_path: Path) -> None:
    """Four connections busy sending request bodies fill the cap: a fifth is answered 503 before any parsing."""
    server = serve(engine, tmp_path, header_timeout_s=120.0, body_timeout_s=120.0, max_connections=4)
    held: list[socket.socket] = []
    try:
        for _ in range(4):
            sock = connect(server)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{")
            held.append(sock)
        deadline = time.monotonic() + DEADLINE_S
        while server.connections() < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        with connect(server) as extra:
            answer = read_until_closed(extra)
        assert answer.startswith(b"HTTP/1.1 503 ") and server.connections() == 4
        held.pop().close()
        while server.connections() > 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(server.url + "/health/live", timeout=60).status_code == 200
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_idle_sockets_cannot_lock_out_real_clients(engine: Any, tmp_path: Path) -> None:
    """At the cap, the connection that has waited longest for a request makes room for the new one."""
    server = serve(engine, tmp_path, header_timeout_s=120.0, max_connections=4)
    held: list[socket.socket] = []
    try:
        for _ in range(4):
            held.append(connect(server))
            deadline = time.monotonic() + DEADLINE_S
            while server.connections() < len(held) and time.monotonic() < deadline:
                time.sleep(0.02)
        for _ in range(3):
            assert httpx.get(server.url + "/health/live", timeout=60).status_code == 200
        assert read_until_closed(held[0]).startswith(b"HTTP/1.1 408 ")  # the oldest idle one made room
        assert server.connections() <= 4
    finally:
        for sock in held:
            sock.close()
        server.stop()
