"""`ting serve` as a process (issue 9): no secrets in its logs; its connections have a header deadline."""

from __future__ import annotations

import base64
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_serve import GENERATION, Serve

SECRET = "c2VjcmV0LXNpZ25hdHVyZS1kby1ub3QtbG9n"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def media(corpus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("media")
    (root / "a.wav").write_bytes(corpus["wav_8k_en"].path.read_bytes())
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Quiet(*a, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.mark.parametrize("level", ["info", "debug"])
def test_signed_url_queries_never_reach_the_logs(tiny_dir: Path, tmp_path: Path, media: str, level: str) -> None:
    serve = Serve(
        tmp_path,
        "--model",
        str(tiny_dir),
        "--home",
        str(tmp_path / "home"),
        "--log-level",
        level,
        "--allow-media-hosts",
        "127.0.0.1",
        "--header-timeout-s",
        "2",
    )
    try:
        serve.wait_ready()
        with socket.create_connection(("127.0.0.1", serve.port), timeout=60) as idle:  # item 6, as `ting serve` runs
            assert idle.recv(100).startswith(b"HTTP/1.1 408 ")
        url = f"{media}/a.wav?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature={SECRET}"
        body = {
            "model": "qwen-audio-turbo",
            "input": {"messages": [{"role": "user", "content": [{"audio": url}, {"text": "What is said?"}]}]},
            "parameters": {"max_tokens": 2},
        }
        r = httpx.post(serve.url + GENERATION, json=body, headers={"Authorization": "Bearer sk-x"}, timeout=60)
        assert r.status_code == 200, r.text
        missing = httpx.post(
            serve.url + GENERATION,
            json={
                **body,
                "input": {
                    "messages": [
                        {"role": "user", "content": [{"audio": url.replace("a.wav", "gone.wav")}, {"text": "?"}]}
                    ]
                },
            },
            timeout=60,
        )
        assert missing.status_code == 400
    finally:
        assert serve.stop() == 0
    logs = serve.err.read_text() + serve.out.read_text()
    assert "127.0.0.1" in logs  # it did log
    assert SECRET not in logs and base64.b64decode(SECRET).decode() not in logs
