"""Readiness: 503 while the model loads, 200 once it serves."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from tests.api.conftest import LiveServer, post
from ting.api.runtime import Runtime
from ting.config import Settings
from ting.engine import Engine


def test_health_is_503_until_the_model_is_loaded(tiny_dir: Path, tmp_path: Path) -> None:
    gate = threading.Event()

    def load() -> Engine:
        gate.wait(60)
        return Engine.load(str(tiny_dir), max_batch_size=2)

    settings = Settings(model=str(tiny_dir), home=str(tmp_path))
    server = LiveServer(settings, runtime=Runtime(settings, load_engine=load)).start()
    try:
        loading = httpx.get(server.url + "/health")
        assert (loading.status_code, loading.json()["status"]) == (503, "loading")
        assert httpx.get(server.url + "/health/live").status_code == 200
        early = post(
            server,
            {"model": "qwen-audio-turbo", "input": {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}},
        )
        assert (early.status_code, early.json()["code"]) == (503, "ModelUnavailable") and early.headers["retry-after"]
        gate.set()
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ok = post(
            server,
            {
                "model": "qwen-audio-turbo",
                "input": {"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
                "parameters": {"max_tokens": 2},
            },
        )
        assert ok.status_code == 200
    finally:
        gate.set()
        server.stop()
        if server.runtime.engine is not None:
            server.runtime.engine.stop()
