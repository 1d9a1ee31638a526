"""Follow-up turns about one recording, through the real app over HTTP (issue 12): the audio URL is revalidated
rather than downloaded, nothing is decoded again, and the answers are the answers without the cache.

The decoder workers are real ones that append a line per container they open to $TING_TEST_DECODE_LOG, so decodes
are counted in the processes that do them; the origin is a threaded HTTP server on 127.0.0.1 that records what it
is asked and answers conditional GETs as an origin does.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import corpus as C
from tests.api.conftest import LiveServer, post
from ting.audio import DecoderPool
from ting.config import Settings

GREEDY = {"temperature": 0, "max_tokens": 12, "seed": 1}


class Origin:
    """Serves one file at /<name>, with the headers given; records each request's conditional headers."""

    def __init__(self, files: dict[str, tuple[bytes, dict[str, str]]]) -> None:
        self.files = files
        self.asked: list[tuple[str, str | None]] = []  # (path, If-None-Match)
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                data, headers = origin.files[self.path]
                sent = self.headers.get("If-None-Match")
                origin.asked.append((self.path, sent))
                status = 304 if sent is not None and sent == headers.get("ETag") else 200
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data) if status == 200 else 0))
                self.end_headers()
                if status == 200:
                    self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{name}"

    def close(self) -> None:
        self._httpd.shutdown()


@pytest.fixture(scope="module")
def origin(corpus: dict[str, C.Sample]) -> Iterator[Origin]:
    speech = corpus["mp3_cbr_en"].path.read_bytes()
    server = Origin(
        {
            "/tagged.mp3": (speech, {"ETag": '"v1"', "Cache-Control": "max-age=0"}),
            "/no-store.mp3": (speech, {"ETag": '"v1"', "Cache-Control": "no-store"}),
        }
    )
    yield server
    server.close()


def start(engine: Any, home: Path, decode_log: Path, **overrides: Any) -> LiveServer:
    """A server whose decoder workers count what they decode."""
    options: dict[str, Any] = dict(model="qwen2-audio-tiny", home=str(home), allow_media_hosts=("127.0.0.1",))
    server = LiveServer(Settings(**(options | overrides)), engine)
    server.runtime.audio.pool = DecoderPool(2, target="tests.audio.workers:counting_decodes")
    return server.start()


@pytest.fixture
def decode_log(tmp_path: Path, test_pythonpath: None, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "decodes.log"
    log.touch()
    monkeypatch.setenv("TING_TEST_DECODE_LOG", str(log))
    return log


def decodes(log: Path) -> int:
    return len(log.read_text().split())


def turns(audio: str, answer: str | None = None) -> dict[str, Any]:
    """The first question about `audio`, or (with the first `answer`) the follow-up: the whole history again."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": [{"audio": audio}, {"text": "What is said?"}]}]
    if answer is not None:
        messages += [
            {"role": "assistant", "content": [{"text": answer}]},
            {"role": "user", "content": [{"text": "And who is speaking?"}]},
        ]
    return {"model": "qwen-audio-turbo", "input": {"messages": messages}, "parameters": GREEDY}


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    content: list[dict[str, str]] = response.json()["output"]["choices"][0]["message"]["content"]
    return content[0]["text"]


def conversation(server: LiveServer, audio: str) -> tuple[str, str]:
    first = text(post(server, turns(audio)))
    return first, text(post(server, turns(audio, first)))


def cache_counters(server: LiveServer) -> dict[str, int]:
    counters: dict[str, int] = httpx.get(server.url + "/health").json()["audio_cache"]
    return counters


def test_the_follow_up_turn_is_revalidated_not_downloaded_nor_decoded_and_answers_the_same(
    engine: Any, tmp_path: Path, origin: Origin, decode_log: Path
) -> None:
    url = origin.url("/tagged.mp3")
    origin.asked.clear()
    server = start(engine, tmp_path / "cached", decode_log)
    try:
        cached = conversation(server, url)
        assert origin.asked == [("/tagged.mp3", None), ("/tagged.mp3", '"v1"')]  # the second was answered 304
        assert decodes(decode_log) == 1
        counters = cache_counters(server)
        assert (counters["hits"], counters["misses"], counters["not_modified"]) == (1, 1, 1)
        assert counters["entries"] == 1 and 0 < counters["size_bytes"] <= counters["capacity_bytes"] == 256 * 2**20
        with ThreadPoolExecutor(3) as threads:  # follow-ups batched together: every one a hit, the same answer
            batched = list(threads.map(lambda _: text(post(server, turns(url, cached[0]))), range(3)))
        assert batched == [cached[1]] * 3 and decodes(decode_log) == 1
    finally:
        server.stop()
    origin.asked.clear()
    server = start(engine, tmp_path / "uncached", decode_log, audio_cache_mib=0)
    try:
        assert conversation(server, url) == cached  # token for token: greedy answers without the cache
        assert origin.asked == [("/tagged.mp3", None), ("/tagged.mp3", None)]
        assert decodes(decode_log) == 1 + 2
    finally:
        server.stop()


def test_an_origin_that_says_no_store_is_downloaded_and_decoded_every_turn(
    engine: Any, tmp_path: Path, origin: Origin, decode_log: Path
) -> None:
    url = origin.url("/no-store.mp3")
    origin.asked.clear()
    server = start(engine, tmp_path / "home", decode_log)
    try:
        conversation(server, url)
        assert origin.asked == [("/no-store.mp3", None), ("/no-store.mp3", None)]  # two full downloads
        assert decodes(decode_log) == 2
        counters = cache_counters(server)
        assert (counters["hits"], counters["entries"], counters["urls"]) == (0, 0, 0)
    finally:
        server.stop()


def test_the_follow_up_turn_finds_the_clips_features_too(
    engine: Any, tmp_path: Path, origin: Origin, decode_log: Path
) -> None:
    """The audio cache hands back the decoded clip itself (read-only samples): prepare finds its log-mel features
    by it rather than extracting them again (issue 14), and the answer is the same."""
    url = origin.url("/tagged.mp3")
    features = engine.backend.inputs.features
    server = start(engine, tmp_path / "features", decode_log)
    try:
        hits = features.hits
        first = text(post(server, turns(url)))
        assert features.hits == hits  # a clip this server's cache had never seen
        second = text(post(server, turns(url, first)))
        assert features.hits == hits + 1
    finally:
        server.stop()
    server = start(engine, tmp_path / "uncached", decode_log, audio_cache_mib=0)
    try:
        hits = features.hits
        assert text(post(server, turns(url, first))) == second  # decoded again: extracted again, the same answer
        assert features.hits == hits
    finally:
        server.stop()
