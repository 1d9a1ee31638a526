"""Hostile inputs over real HTTP: each is refused cheaply, in the protocol's own envelope, and hurts nobody else."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import corpus as C
from tests.api.conftest import LiveServer, post
from ting.api.middleware import LargeBodyPacing
from ting.audio.decode import DecoderPool
from ting.config import Settings

OPENAI_CHAT = "/v1/chat/completions"


def dashscope(text: str = "Hi", **parameters: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "qwen-audio-turbo",
        "input": {"messages": [{"role": "user", "content": [{"text": text}]}]},
    }
    body["parameters"] = {"max_tokens": 2, **parameters}
    return body


def openai(text: str = "Hi", **fields: Any) -> dict[str, Any]:
    return {"model": "qwen-audio-turbo", "messages": [{"role": "user", "content": text}], "max_tokens": 2, **fields}


def dashscope_error(r: Any, code: str = "InvalidParameter") -> str:
    assert r.status_code == 400, r.text
    body = r.json()
    assert set(body) == {"code", "message", "request_id"} and body["code"] == code
    return str(body["message"])


def openai_error(r: Any) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    return dict(error)


class CountedPrepare:
    """Wraps the real backend's prepare (chat template, tokenizer, feature extractor): counts calls, names threads."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.calls, self.threads = inner, 0, set()
        self._lock = threading.Lock()

    def __call__(self, messages):  # type: ignore[no-untyped-def]
        with self._lock:
            self.calls += 1
            self.threads.add(threading.current_thread().name)
        return self.inner(messages)


@pytest.fixture
def prepared(engine, monkeypatch: pytest.MonkeyPatch) -> CountedPrepare:  # type: ignore[no-untyped-def]
    counted = CountedPrepare(engine.backend.prepare)
    monkeypatch.setattr(engine.backend, "prepare", counted)
    return counted


# --- huge prompts (issue 9, item 1) ----------------------------------------------------------------------------

TOO_MANY_CHARS = "a" * 96_001  # 16 characters per token of qwen-audio-turbo's 6,000: refused before tokenizing
BODY_SIZED = "字" * (10 * 1024 * 1024)  # 30 MiB of UTF-8: under the 32 MiB body limit, past any text bound


def test_a_prompt_too_long_to_fit_is_refused_without_tokenizing(server: LiveServer, prepared: CountedPrepare) -> None:
    assert dashscope_error(post(server, dashscope(TOO_MANY_CHARS))) == "Range of input length should be [1, 6000]"
    error = openai_error(post(server, openai(TOO_MANY_CHARS), path=OPENAI_CHAT))
    assert error["message"] == "Range of input length should be [1, 6000]"
    assert error["code"] == "context_length_exceeded"
    assert prepared.calls == 0


def test_absurd_bodies_are_refused_at_validation(server: LiveServer, prepared: CountedPrepare) -> None:
    assert "at most 1048576 characters" in dashscope_error(post(server, dashscope(BODY_SIZED)))
    parts = {"model": "qwen-audio-turbo", "input": {"messages": [{"role": "user", "content": [{"text": BODY_SIZED}]}]}}
    assert "input.messages.0.content.0.text" in dashscope_error(post(server, parts))
    assert "at most 1048576 characters" in openai_error(post(server, openai(BODY_SIZED), path=OPENAI_CHAT))["message"]
    many = [{"role": "user", "content": "hi"}] * 1025
    error = openai_error(post(server, {**openai(), "messages": many}, path=OPENAI_CHAT))
    assert "at most 1024 items" in error["message"]
    body = dashscope()
    body["input"]["messages"] = many
    assert "at most 1024 items" in dashscope_error(post(server, body))
    assert prepared.calls == 0


def test_a_prompt_within_the_estimate_is_tokenized_on_its_own_threads(
    server: LiveServer, prepared: CountedPrepare
) -> None:
    assert dashscope_error(post(server, dashscope("a" * 60_000))) == "Range of input length should be [1, 6000]"
    assert post(server, dashscope("What is said?")).status_code == 200
    assert prepared.calls == 2
    assert all(name.startswith("ting-prepare") for name in prepared.threads), prepared.threads


def test_an_ordinary_request_is_served_while_huge_ones_are_in_flight(
    server: LiveServer, prepared: CountedPrepare
) -> None:
    huge = [
        lambda: post(server, dashscope(BODY_SIZED)),
        lambda: post(server, openai(BODY_SIZED), path=OPENAI_CHAT),
        lambda: post(server, dashscope(TOO_MANY_CHARS)),
        lambda: post(server, openai(TOO_MANY_CHARS), path=OPENAI_CHAT),
    ] * 2
    with ThreadPoolExecutor(len(huge) + 1) as pool:
        refused = [pool.submit(h) for h in huge]
        ordinary = pool.submit(post, server, dashscope("What is said?"))
        assert ordinary.result().status_code == 200
        assert [f.result().status_code for f in refused] == [400] * len(huge)
    assert prepared.calls == 1  # the ordinary request's


# --- seeds (issue 9, item 7) -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1, 1e30, 1.5, "x"])
def test_an_openai_seed_outside_int64_is_a_400(server: LiveServer, seed: Any) -> None:
    error = openai_error(post(server, openai(seed=seed), path=OPENAI_CHAT))
    assert "seed" in error["message"]


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63 - 1, 0])
def test_any_int64_seed_is_served(server: LiveServer, seed: int) -> None:
    r = post(server, openai(seed=seed, temperature=1.0), path=OPENAI_CHAT)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("seed", [2**64, 2**31, -1, 1.5])
def test_a_dashscope_seed_outside_its_range_is_a_400(server: LiveServer, seed: Any) -> None:
    assert "seed" in dashscope_error(post(server, dashscope(seed=seed)))


# --- stop lists (issue 9, item 2) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stop",
    [[f"s{i}" for i in range(200_000)], [f"s{i}" for i in range(17)], ["x" * 257], list(range(17)), [-1], [2**40]],
)
def test_a_dashscope_stop_list_past_its_bounds_is_a_400(server: LiveServer, stop: list[Any]) -> None:
    assert "stop" in dashscope_error(post(server, dashscope(stop=stop)))


@pytest.mark.parametrize("stop", [[f"s{i}" for i in range(16)], ["x" * 256], list(range(16)), "\n\n"])
def test_a_dashscope_stop_list_within_its_bounds_is_served(server: LiveServer, stop: Any) -> None:
    assert post(server, dashscope(stop=stop)).status_code == 200


@pytest.mark.parametrize("stop", [[f"s{i}" for i in range(5)], ["x" * 257], "x" * 257])
def test_an_openai_stop_list_past_its_bounds_is_a_400(server: LiveServer, stop: Any) -> None:
    assert "stop" in openai_error(post(server, openai(stop=stop), path=OPENAI_CHAT))["message"]


# --- hours of audio to transcribe (issue 9, item 3) ------------------------------------------------------------


@pytest.fixture(scope="module")
def long_recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not C.have("ffmpeg"):
        pytest.skip("ffmpeg is needed")
    return C.long_recordings(tmp_path_factory.mktemp("long"))


def transcribe(server: LiveServer, path: Path) -> httpx.Response:
    with path.open("rb") as f:
        return httpx.post(
            server.url + "/v1/audio/transcriptions",
            files={"file": (path.name, f)},
            data={"model": "qwen-audio-turbo"},
            headers={"Authorization": "Bearer sk-test"},
            timeout=120,
        )


def test_hours_of_audio_to_transcribe_are_refused_without_decoding_them(
    engine, long_recordings, tmp_path: Path, test_pythonpath, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "decoded-packets.log"  # one line per container a decoder worker opened: packets it decoded
    monkeypatch.setenv("TING_TEST_DECODE_LOG", str(log))
    server = LiveServer(Settings(model="qwen2-audio-tiny", home=str(tmp_path / "home")), engine)
    server.runtime.audio.pool = DecoderPool(2, target="tests.audio.workers:counting_decodes")
    server.start()
    try:
        for name in ("opus_2h", "mp3_2h"):
            r = transcribe(server, long_recordings[name])
            assert r.status_code == 400, r.text
            assert r.json()["error"]["message"] == "The input audio is longer than 600s."
        counts = [int(n) for n in log.read_text().split()]
        assert counts and sum(counts) == 0
        short = C.write_wav(tmp_path / "short.wav", C.tone(2.0, rate=8000), rate=8000)  # 8 kHz: a worker decodes it
        assert transcribe(server, short).status_code == 200
        assert int(log.read_text().split()[-1]) > 0  # the hook sees packets a worker does decode
    finally:
        server.stop()


# --- large bodies share the event loop (bench/hostile.py: huge prompts, stop lists, uploads) --------------------


async def test_large_bodies_take_turns_and_small_requests_never_wait_for_them() -> None:
    parsed: list[str] = []

    async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        while (await receive()).get("more_body"):
            pass
        parsed.append(scope["path"])
        if scope["path"].startswith("/large"):
            time.sleep(0.2)  # parsing megabytes holds the loop
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    paced = LargeBodyPacing(app, threshold_bytes=1024)

    async def request(path: str, size: int) -> None:
        pieces = [
            {"type": "http.request", "body": b"x" * (size // 2), "more_body": True},
            {"type": "http.request", "body": b"x" * (size - size // 2), "more_body": False},
        ]

        async def receive() -> dict[str, Any]:
            return pieces.pop(0) if pieces else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            pass

        scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-length", str(size).encode())]}
        await paced(scope, receive, send)

    await asyncio.gather(request("/large-1", 1 << 20), request("/large-2", 1 << 20), request("/small", 100))
    assert sorted(parsed) == ["/large-1", "/large-2", "/small"]
    assert parsed.index("/small") < parsed.index("/large-2")  # the small one did not wait behind both large ones
    assert parsed.index("/large-1") < parsed.index("/large-2")  # which took their turns in order
