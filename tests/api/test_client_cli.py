"""ting.client (sync and async) and the `ting chat` / `ting transcribe` commands against a live server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api.conftest import LiveServer, MediaHost, live_server
from ting.client import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConnectionFailed,
    Transcript,
    _common,
)

GREEDY = dict(temperature=0, max_tokens=12, seed=3)


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Client:
    with Client(server.url, "sk-test") as c:
        yield c


def test_chat_with_a_path_bytes_or_a_url(client: Client, corpus, media: MediaHost) -> None:  # type: ignore[no-untyped-def]
    path = corpus["mp3_cbr_en"].path
    by_path = client.chat("What is said?", audio=path, **GREEDY)
    by_bytes = client.chat("What is said?", audio=path.read_bytes(), **GREEDY)
    by_url = client.chat("What is said?", audio=media.url("mp3_cbr_en"), **GREEDY)
    assert by_path.text == by_bytes.text == by_url.text
    assert by_path.usage.audio_tokens == by_url.usage.audio_tokens > 25
    assert by_path.finish_reason in ("stop", "length") and len(by_path.request_id) == 36


def test_streaming_and_history(client: Client, corpus) -> None:  # type: ignore[no-untyped-def]
    first = client.chat("What is said?", audio=str(corpus["flac_zh"].path), **GREEDY)
    deltas = list(client.chat("What is said?", audio=str(corpus["flac_zh"].path), stream=True, **GREEDY))
    assert "".join(d.text for d in deltas) == first.text and deltas[-1].finish_reason == first.finish_reason
    follow = client.chat("And in English?", history=first.messages, **GREEDY)
    assert [m["role"] for m in follow.messages] == ["user", "assistant", "user", "assistant"]
    assert follow.usage.input_tokens > first.usage.input_tokens


def test_large_files_go_through_the_upload_flow(client: Client, corpus, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    inline = client.chat("Hi", audio=corpus["wav_pcm_s16_en"].path, **GREEDY)
    monkeypatch.setattr("ting.client._sync.INLINE_MAX_BYTES", 1000)
    uploaded = client.chat("Hi", audio=corpus["wav_pcm_s16_en"].path, **GREEDY)
    assert uploaded.messages[0]["content"][0]["audio"].startswith("oss://dashscope-instant/")
    assert uploaded.text == inline.text


def test_transcripts(client: Client, corpus) -> None:  # type: ignore[no-untyped-def]
    t = client.transcribe(corpus["ogg_vorbis_en"].path, language="en")
    assert isinstance(t, Transcript) and len(t.segments) == 1 and t.duration == pytest.approx(5.07, abs=0.05)
    srt = client.transcribe(corpus["ogg_vorbis_en"].path, response_format="srt")
    assert isinstance(srt, str) and srt.startswith("1\n00:00:00,000 --> 00:00:05,0")


def test_typed_errors(client: Client, engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadRequestError) as e:
        client.chat("?", audio=b"definitely not audio")
    assert (e.value.status, e.value.code) == (400, "InvalidParameter") and e.value.request_id
    with pytest.raises(BadRequestError, match="cannot read the audio file"):
        client.chat("?", audio=tmp_path / "missing.wav")
    with pytest.raises(ConnectionFailed):
        Client("http://127.0.0.1:9").chat("hi")
    with live_server(engine, tmp_path, api_key=("sk-right",)) as s:
        with pytest.raises(AuthenticationError) as e:
            Client(s.url, "sk-wrong").chat("hi")
        assert e.value.code == "InvalidApiKey"
        assert Client(s.url, "sk-right").chat("hi", max_tokens=2).usage.output_tokens >= 1


async def test_the_async_client(server: LiveServer, corpus) -> None:  # type: ignore[no-untyped-def]
    async with AsyncClient(server.url, "sk-test") as c:
        whole = await c.chat("What is said?", audio=corpus["webm_opus_en"].path, **GREEDY)
        deltas = [d async for d in c.stream("What is said?", audio=corpus["webm_opus_en"].path, **GREEDY)]
        assert "".join(d.text for d in deltas) == whole.text
        t = await c.transcribe(corpus["webm_opus_en"].path)
        assert isinstance(t, Transcript)
        with pytest.raises(BadRequestError):
            await c.chat("?", audio=b"nope")


def test_the_client_imports_nothing_from_the_server() -> None:
    code = ("import sys, ting.client; bad = [m for m in sys.modules if m.startswith('ting.') and "
            "not m.startswith('ting.client')]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    assert _common.DEFAULT_BASE_URL == "http://127.0.0.1:8000"


# --- the commands --------------------------------------------------------------------------------------------


def ting(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ting", *args], input=stdin, capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_ting_chat_streams_the_answer(server: LiveServer, client: Client, corpus) -> None:  # type: ignore[no-untyped-def]
    path = str(corpus["wav_pcm_s16_zh"].path)
    expected = client.chat("这段音频说的是什么?", audio=path, **GREEDY).text
    out = ting("chat", path, "这段音频说的是什么?", "--url", server.url, "--temperature", "0", "--max-tokens", "12",
               "--seed", "3", env={"TING_API_KEY": "sk-test"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"


def test_ting_chat_interactive(server: LiveServer, corpus) -> None:  # type: ignore[no-untyped-def]
    out = ting("chat", "-i", str(corpus["amr_wb_en"].path), "--url", server.url, "--max-tokens", "6",
               stdin="What is said?\nAnd then?\n\n")
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
        right = ting("chat", str(corpus["flac_en"].path), "hi", "--url", s.url, "--max-tokens", "3",
                     env={"DASHSCOPE_API_KEY": "sk-right"})
        assert right.returncode == 0, right.stderr
