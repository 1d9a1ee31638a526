"""ting.client (sync and async) and the `ting chat` / `ting transcribe` commands against a live server."""

from __future__ import annotations

import asyncio
import http.server
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.api.conftest import LiveServer, MediaHost, live_server
from ting.client import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConnectionFailed,
    QuotaExceededError,
    RateLimitError,
    ServerError,
    Transcript,
    _common,
)

GREEDY = dict(temperature=0, max_tokens=12, seed=3)


class Both:
    """One scenario, run against Client or AsyncClient: `call("chat", ...)` gives the same plain values either way
    (streams as lists), so each test below holds the two clients to one behaviour."""

    def __init__(self, kind: str, base_url: str, api_key: str | None = "sk-test", **options: Any) -> None:
        self.kind, self.base_url, self.api_key, self.options = kind, base_url, api_key, options

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.kind == "sync":
            with Client(self.base_url, self.api_key, **self.options) as c:
                result = getattr(c, method)(*args, **kwargs)
                return list(result) if isinstance(result, Iterator) else result
        return asyncio.run(self._acall(method, *args, **kwargs))

    async def _acall(self, method: str, *args: Any, **kwargs: Any) -> Any:
        async with AsyncClient(self.base_url, self.api_key, **self.options) as c:
            result = getattr(c, method)(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return [d async for d in result] if isinstance(result, AsyncIterator) else result


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[Client]:
    with Client(server.url, "sk-test") as c:
        yield c


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def both(server: LiveServer, kind: str) -> Both:
    return Both(kind, server.url)


def test_chat_with_a_path_bytes_or_a_url(both: Both, corpus, media: MediaHost) -> None:  # type: ignore[no-untyped-def]
    path = corpus["mp3_cbr_en"].path
    by_path = both.call("chat", "What is said?", audio=path, **GREEDY)
    by_bytes = both.call("chat", "What is said?", audio=path.read_bytes(), **GREEDY)
    by_url = both.call("chat", "What is said?", audio=media.url("mp3_cbr_en"), **GREEDY)
    assert by_path.text == by_bytes.text == by_url.text
    assert by_path.usage.audio_tokens == by_url.usage.audio_tokens > 25
    assert by_path.finish_reason in ("stop", "length") and len(by_path.request_id) == 36


def test_streaming_and_history(both: Both, corpus) -> None:  # type: ignore[no-untyped-def]
    first = both.call("chat", "What is said?", audio=str(corpus["flac_zh"].path), **GREEDY)
    deltas = both.call("stream", "What is said?", audio=str(corpus["flac_zh"].path), **GREEDY)
    assert "".join(d.text for d in deltas) == first.text and deltas[-1].finish_reason == first.finish_reason
    same = both.call("chat", "What is said?", audio=str(corpus["flac_zh"].path), stream=True, **GREEDY)
    assert [d.text for d in same] == [d.text for d in deltas]
    follow = both.call("chat", "And in English?", history=first.messages, **GREEDY)
    assert [m["role"] for m in follow.messages] == ["user", "assistant", "user", "assistant"]
    assert follow.usage.input_tokens > first.usage.input_tokens


def test_large_files_go_through_the_upload_flow(both: Both, corpus, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    inline = both.call("chat", "Hi", audio=corpus["wav_pcm_s16_en"].path, **GREEDY)
    monkeypatch.setattr("ting.client._common.INLINE_MAX_BYTES", 1000)
    uploaded = both.call("chat", "Hi", audio=corpus["wav_pcm_s16_en"].path, **GREEDY)
    assert uploaded.messages[0]["content"][0]["audio"].startswith("oss://dashscope-instant/")
    assert uploaded.text == inline.text
    assert both.call("upload", corpus["wav_pcm_s16_en"].path).startswith("oss://dashscope-instant/")


def test_transcripts(both: Both, corpus, media: MediaHost) -> None:  # type: ignore[no-untyped-def]
    t = both.call("transcribe", corpus["ogg_vorbis_en"].path, language="en")
    assert isinstance(t, Transcript) and len(t.segments) == 1 and t.duration == pytest.approx(5.07, abs=0.05)
    assert t.language == "english"
    srt = both.call("transcribe", corpus["ogg_vorbis_en"].path, response_format="srt")
    assert isinstance(srt, str) and srt.startswith("1\n00:00:00,000 --> 00:00:05,0")
    by_url = both.call("transcribe", media.url("ogg_vorbis_en"), language="en")
    assert by_url.text == t.text
    with pytest.raises(ConnectionFailed, match=r"cannot download .*HTTP 404"):
        both.call("transcribe", media.url("no-such-file"))
    translated = both.call("transcribe", corpus["ogg_vorbis_en"].path, translate=True, response_format="text")
    assert isinstance(translated, str)


def test_typed_errors(both: Both, engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadRequestError) as e:
        both.call("chat", "?", audio=b"definitely not audio")
    assert (e.value.status, e.value.code) == (400, "InvalidParameter") and e.value.request_id
    with pytest.raises(BadRequestError, match="cannot read the audio file"):
        both.call("chat", "?", audio=tmp_path / "missing.wav")
    with pytest.raises(ConnectionFailed):
        Both(both.kind, "http://127.0.0.1:9").call("chat", "hi")
    with live_server(engine, tmp_path, api_key=("sk-right",)) as s:
        with pytest.raises(AuthenticationError) as e:
            Both(both.kind, s.url, "sk-wrong").call("chat", "hi")
        assert e.value.code == "InvalidApiKey"
        assert Both(both.kind, s.url, "sk-right").call("chat", "hi", max_tokens=2).usage.output_tokens >= 1


def test_the_two_clients_have_the_same_public_methods() -> None:
    def methods(cls: type) -> dict[str, list[tuple[str, Any, Any]]]:
        return {
            name: [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]
            for name, f in vars(cls).items()
            if callable(f) and not name.startswith("_")
        }

    sync, asynchronous = methods(Client), methods(AsyncClient)
    assert sync.pop("close") == asynchronous.pop("aclose")  # closing is the one name that differs, as in httpx
    assert sync == asynchronous and set(sync) == {"chat", "stream", "transcribe", "upload"}


# --- retries: a server that answers 429/503 with Retry-After ------------------------------------------------------


class Flaky:
    """A loopback HTTP server answering from a script of (status, headers) replies, then a DashScope answer."""

    OK: ClassVar[dict[str, Any]] = {
        "output": {
            "choices": [{"finish_reason": "stop", "message": {"role": "assistant", "content": [{"text": "hello"}]}}]
        },
        "usage": {"audio_tokens": 0, "output_tokens": 1, "input_tokens": 3},
        "request_id": "r-1",
    }
    STREAM = (
        'id:1\nevent:result\n:HTTP_STATUS/200\ndata:{"output":{"choices":[{"message":{"role":"assistant",'
        '"content":[{"text":"hello"}]},"finish_reason":"null"}]},"usage":{},"request_id":"r-1"}\n\n'
        'id:2\nevent:result\n:HTTP_STATUS/200\ndata:{"output":{"choices":[{"message":{"role":"assistant",'
        '"content":[]},"finish_reason":"stop"}]},"usage":{},"request_id":"r-1"}\n\n'
    )

    def __init__(self, script: list[tuple[int, dict[str, str]]]) -> None:
        self.script = list(script)
        self.seen_at: list[float] = []  # time.monotonic() of each request
        flaky = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                flaky.seen_at.append(time.monotonic())
                if flaky.script:
                    status, headers = flaky.script.pop(0)
                    code = "insufficient_quota" if headers.pop("x-quota", None) else "Throttling"
                    self._reply(status, headers, json.dumps({"code": code, "message": "busy", "request_id": "r"}))
                elif self.headers.get("x-dashscope-sse") == "enable":
                    self._reply(200, {"content-type": "text/event-stream"}, Flaky.STREAM)
                else:
                    self._reply(200, {}, json.dumps(Flaky.OK))

            def _reply(self, status: int, headers: dict[str, str], body: str) -> None:
                data = body.encode()
                self.send_response(status)
                for k, v in {"content-type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def flaky() -> Iterator[Callable[[list[tuple[int, dict[str, str]]]], Flaky]]:
    servers: list[Flaky] = []

    def make(script: list[tuple[int, dict[str, str]]]) -> Flaky:
        servers.append(Flaky(script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_429_and_503_are_retried_after_retry_after(kind: str, flaky) -> None:  # type: ignore[no-untyped-def]
    server = flaky([(429, {"retry-after": "1"}), (503, {"retry-after": "1"})])
    result = Both(kind, server.url).call("chat", "hi")
    assert result.text == "hello" and len(server.seen_at) == 3
    gaps = [b - a for a, b in itertools.pairwise(server.seen_at)]
    assert all(gap >= 0.9 for gap in gaps)  # each retry waited the second the server asked for
    streaming = flaky([(429, {"retry-after": "1"})])
    deltas = Both(kind, streaming.url).call("stream", "hi")
    assert [d.text for d in deltas] == ["hello", ""] and len(streaming.seen_at) == 2
    assert streaming.seen_at[1] - streaming.seen_at[0] >= 0.9


def test_retries_are_bounded(kind: str, flaky) -> None:  # type: ignore[no-untyped-def]
    always = flaky([(429, {"retry-after": "0"})] * 10)
    with pytest.raises(RateLimitError) as e:
        Both(kind, always.url, max_retries=2).call("chat", "hi")
    assert len(always.seen_at) == 3 and e.value.retry_after == 0
    patient = flaky([(429, {"retry-after": "3600"})])  # longer than the client will wait: raised at once
    with pytest.raises(RateLimitError) as e:
        Both(kind, patient.url, max_retry_wait_s=30).call("chat", "hi")
    assert len(patient.seen_at) == 1 and e.value.retry_after == 3600
    spent = flaky([(429, {"retry-after": "0", "x-quota": "1"})])  # a spent quota does not come back by waiting
    with pytest.raises(QuotaExceededError):
        Both(kind, spent.url).call("chat", "hi")
    assert len(spent.seen_at) == 1
    never = flaky([(503, {})])
    with pytest.raises(ServerError):
        Both(kind, never.url, max_retries=0).call("chat", "hi")
    assert len(never.seen_at) == 1


def test_a_real_rate_limit_gives_its_retry_after(kind: str, engine, tmp_path: Path, corpus) -> None:  # type: ignore[no-untyped-def]
    with live_server(engine, tmp_path) as s:
        key, info = s.run(s.runtime.store.keys.create(rpm=1))
        client = Both(kind, s.url, key, max_retry_wait_s=0.5)  # Ting asks for up to a minute: too long to wait here
        assert client.call("chat", "hi", max_tokens=2).usage.output_tokens >= 1
        with pytest.raises(RateLimitError) as e:
            client.call("chat", "hi", max_tokens=2)
        assert e.value.code == "Throttling.RateQuota" and 1 <= e.value.retry_after <= 60
        rows = [r for r in s.run(s.runtime.store.ledger.rows()) if r.key_id == info.id]
        assert [r.status for r in rows] == ["ok", "refused"]  # given back at once, not retried


def test_the_client_imports_nothing_from_the_server() -> None:
    code = (
        "import sys, ting.client; bad = [m for m in sys.modules if m.startswith('ting.') and "
        "not m.startswith('ting.client')]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    assert _common.DEFAULT_BASE_URL == "http://127.0.0.1:8000"


# --- the commands --------------------------------------------------------------------------------------------


def ting(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ting", *args], input=stdin, capture_output=True, text=True, env=full_env, timeout=120
    )


def test_ting_chat_streams_the_answer(server: LiveServer, client: Client, corpus) -> None:  # type: ignore[no-untyped-def]
    path = str(corpus["wav_pcm_s16_zh"].path)
    expected = client.chat("这段音频说的是什么?", audio=path, **GREEDY).text
    out = ting(
        "chat",
        path,
        "这段音频说的是什么?",
        "--url",
        server.url,
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--seed",
        "3",
        env={"TING_API_KEY": "sk-test"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"


def test_ting_chat_interactive(server: LiveServer, corpus) -> None:  # type: ignore[no-untyped-def]
    out = ting(
        "chat",
        "-i",
        str(corpus["amr_wb_en"].path),
        "--url",
        server.url,
        "--max-tokens",
        "6",
        stdin="What is said?\nAnd then?\n\n",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("> ") == 3  # two questions, then the empty line that ends it
    answers = [line for line in out.stdout.split("> ") if line.strip()]
    assert len(answers) == 2


def test_ting_transcribe_formats(server: LiveServer, corpus) -> None:  # type: ignore[no-untyped-def]
    path = str(corpus["mp3_vbr_id3_en"].path)
    srt = ting("transcribe", path, "--format", "srt", "--url", server.url)
    assert srt.returncode == 0 and re.match(r"1\n00:00:00,000 --> 00:00:0\d,\d\d\d\n", srt.stdout)
    vtt = ting("transcribe", path, "--format", "vtt", "--url", server.url)
    assert vtt.stdout.startswith("WEBVTT\n\n00:00:00.000 --> ")
    js = ting("transcribe", path, "--format", "json", "--url", server.url)
    assert '"segments"' in js.stdout and '"duration"' in js.stdout


def test_the_commands_explain_what_went_wrong(engine, tmp_path: Path, corpus) -> None:  # type: ignore[no-untyped-def]
    down = ting("chat", str(corpus["flac_en"].path), "hi", "--url", "http://127.0.0.1:9")
    assert down.returncode == 1 and "cannot reach http://127.0.0.1:9" in down.stderr and "ting serve" in down.stderr
    missing = ting("transcribe", str(tmp_path / "nope.wav"), "--url", "http://127.0.0.1:9")
    assert missing.returncode == 1 and "cannot read the audio file" in missing.stderr
    with live_server(engine, tmp_path, api_key=("sk-right",)) as s:
        wrong = ting("chat", str(corpus["flac_en"].path), "hi", "--url", s.url, "--api-key", "sk-wrong")
        assert wrong.returncode == 1 and "InvalidApiKey" in wrong.stderr and "--api-key" in wrong.stderr
        right = ting(
            "chat",
            str(corpus["flac_en"].path),
            "hi",
            "--url",
            s.url,
            "--max-tokens",
            "3",
            env={"DASHSCOPE_API_KEY": "sk-right"},
        )
        assert right.returncode == 0, right.stderr
