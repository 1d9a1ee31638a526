"""The same examples with dashscope 1.14.1, the oldest SDK still in use (run in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api.conftest import LiveServer, MediaHost

ROOT = Path(__file__).resolve().parents[2]
SDK = ROOT / ".cache" / "sdk" / "dashscope-1.14.1"


@pytest.fixture(scope="module")
def results(server: LiveServer, media: MediaHost, corpus, tmp_path_factory) -> dict[str, list[dict]]:  # type: ignore[no-untyped-def]
    if not (SDK / "dashscope").is_dir():
        pytest.skip("dashscope 1.14.1 is not installed beside the project (scripts/install --dev installs it)")
    local = tmp_path_factory.mktemp("sdk114") / "recording.wav"
    local.write_bytes(corpus["wav_pcm_s16_zh"].path.read_bytes())
    env = {**os.environ, "PYTHONPATH": str(SDK)}
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("sdk_examples.py")),
            server.dashscope_base,
            media.url("welcome.mp3"),
            str(local),
            str(corpus["amr_wb_zh"].path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(SDK),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    grouped: dict[str, list[dict]] = {}
    for line in out.stdout.splitlines():
        item = json.loads(line)
        grouped.setdefault(item["example"], []).append(item)
    assert (
        "dashscope-1.14.1"
        in subprocess.run(
            [sys.executable, "-c", "import dashscope; print(dashscope.__file__)"],
            env=env,
            capture_output=True,
            text=True,
            cwd=str(SDK),
        ).stdout
    )
    return grouped


@pytest.mark.parametrize("example", ["quick start", "multi-turn", "voice chat", "local file", "base64"])
def test_each_example_answers(results: dict[str, list[dict]], example: str) -> None:
    [item] = results[example]
    assert item["status_code"] == 200, item
    assert item["role"] == "assistant" and isinstance(item["text"], str)
    assert item["finish_reason"] in ("stop", "length")
    assert item["usage"]["audio_tokens"] >= 25 or (example == "multi-turn" and item["usage"]["audio_tokens"] > 0)


def test_streaming_in_both_modes(results: dict[str, list[dict]]) -> None:
    deltas = results["stream incremental=True"]
    whole = results["stream incremental=False"]
    assert all(i["status_code"] == 200 for i in deltas + whole)
    assert len(deltas) > 1 and len(whole) > 1
    assert deltas[-1]["text"] is None and all(i["text"] is not None for i in deltas[:-1] + whole)
    assert "".join(i["text"] for i in deltas[:-1]) == whole[-1]["text"] == results["quick start"][0]["text"]
    assert [i["finish_reason"] for i in whole][:-1] == ["null"] * (len(whole) - 1)


def test_errors(results: dict[str, list[dict]]) -> None:
    [item] = results["error"]
    assert (item["status_code"], item["code"]) == (400, "InvalidURL")
