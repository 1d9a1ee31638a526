"""One request lifecycle: what the ledger and the access log say when a request fails in the server's hands."""

from __future__ import annotations

import io
import json
import logging
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.api.conftest import live_server, wait_for
from tests.api.test_dashscope_http import request
from ting.errors import Overloaded
from ting.types import GenerationChunk


def wav_bytes(seconds: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    samples = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 0.5 * t))).astype(np.float32)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def ledger(s: Any) -> list[Any]:
    return [r for r in s.run(s.runtime.store.ledger.rows()) if r.status != "pending"]


def test_an_unexpected_error_is_a_500_with_its_request_id_recorded_as_an_error(  # type: ignore[no-untyped-def]
    engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with live_server(engine, tmp_path) as s, caplog.at_level(logging.INFO):

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("injected fault")

        monkeypatch.setattr(engine, "resolve", broken)  # a bug of ours, after admission
        r = httpx.post(
            s.url + "/api/v1/services/aigc/multimodal-generation/generation",
            json=request(None, "Hello"),
            headers={"Authorization": "Bearer sk-test"},
            timeout=60,
        )
        o = httpx.post(
            s.url + "/v1/chat/completions",
            headers={"Authorization": "Bearer sk-test"},
            timeout=60,
            json={"model": "qwen-audio-turbo", "messages": [{"role": "user", "content": "Hello"}]},
        )
        monkeypatch.undo()
        wait_for(lambda: len(ledger(s)) == 2, "two settled ledger rows")
        rows = ledger(s)
    assert r.status_code == 500 and r.json()["code"] == "InternalError"
    assert r.headers["x-request-id"] == r.json()["request_id"]
    assert o.status_code == 500 and o.json()["error"]["type"] == "server_error" and o.headers["x-request-id"]
    assert sorted((row.request_id, row.status, row.error_code) for row in rows) == sorted(
        [(r.headers["x-request-id"], "error", "InternalError"), (o.headers["x-request-id"], "error", "InternalError")]
    )
    access = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "ting.access"]
    assert {(a["status"], a["outcome"], a["code"]) for a in access if a["path"] != "/health"} == {
        (500, "error", "InternalError")
    }
    assert (
        sum(
            "injected fault" in rec.getMessage() or "injected fault" in (rec.exc_text or "")
            for rec in caplog.records
            if rec.levelno >= logging.ERROR
        )
        == 2
    )  # logged once each, with its cause


def test_a_window_that_fails_cancels_its_siblings_and_the_request_is_charged_what_ran(  # type: ignore[no-untyped-def]
    engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audio = wav_bytes(75.0)  # three 30 s windows
    real_generate = engine.generate
    calls: list[int] = []
    finished: set[int] = set()
    unfinished_at_failure: set[int] = set()

    async def one_window_refused(
        prompt: Any, sampling: Any, *, request_id: str = "", cache_salt: str = ""
    ) -> AsyncIterator[GenerationChunk]:
        window = len(calls)
        calls.append(window)
        n = 0
        async for chunk in real_generate(prompt, sampling, request_id=request_id, cache_salt=cache_salt):
            yield chunk
            n += 1
            if window == 2 and n == 3:  # the last window: three tokens, then the engine refuses it
                unfinished_at_failure.update({0, 1} - finished)
                raise Overloaded(retry_after_s=1.0)
        finished.add(window)

    with live_server(engine, tmp_path) as s:
        aborted = engine.stats.aborted
        monkeypatch.setattr(engine, "generate", one_window_refused)
        r = httpx.post(
            s.url + "/v1/audio/transcriptions",
            headers={"Authorization": "Bearer sk-test"},
            timeout=120,
            files={"file": ("long.wav", audio)},
            data={"model": "qwen-audio-turbo"},
        )
        monkeypatch.undo()
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert r.headers["retry-after"] == "1"
        # The two other windows are stopped, not left generating for nobody.
        wait_for(lambda: engine.stats.aborted - aborted >= len(unfinished_at_failure) + 1, "the windows to stop")
        wait_for(lambda: len(ledger(s)) == 1, "the ledger row")
        (row,) = ledger(s)
    assert calls == [0, 1, 2] and unfinished_at_failure  # (the tiny model's answers run to 1,500 tokens)
    assert engine.stats.aborted - aborted == len(unfinished_at_failure) + 1
    assert (row.status, row.error_code) == ("error", "ServiceUnavailable")
    # Charged what ran: each window that produced tokens is billed its audio and its output so far.
    assert row.output_tokens >= 3 and row.audio_tokens >= 750 and row.input_tokens > 0
    assert row.charged_tokens == row.audio_tokens + row.input_tokens + row.output_tokens
