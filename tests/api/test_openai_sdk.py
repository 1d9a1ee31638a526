"""The official openai Python SDK against a live server: chat with audio, and Whisper-style transcripts."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import openai
import pytest
from openai import OpenAI

from tests import corpus as C
from tests.api.conftest import LiveServer, MediaHost, live_server
from ting.audio.decode import decode_bytes
from ting.audio.tokens import billed_audio_tokens
from ting.service.transcription import windows


@pytest.fixture(scope="module")
def client(server: LiveServer) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def ask(audio_part: dict, text: str = "What is said?") -> list[dict]:
    return [{"role": "user", "content": [audio_part, {"type": "text", "text": text}]}]


def billed(path: Path) -> int:
    return billed_audio_tokens(len(decode_bytes(path.read_bytes()).samples))


# --- chat ------------------------------------------------------------------------------------------------------


def test_chat_with_base64_audio(client: OpenAI, corpus) -> None:  # type: ignore[no-untyped-def]
    path = corpus["wav_pcm_s16_en"].path
    r = client.chat.completions.create(model="qwen-audio-turbo", max_tokens=16, temperature=0, messages=ask(
        {"type": "input_audio", "input_audio": {"data": b64(path), "format": "wav"}}))
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens_details.audio_tokens == billed(path)
    assert u.prompt_tokens == u.prompt_tokens_details.audio_tokens + u.prompt_tokens_details.text_tokens
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and 1 <= u.completion_tokens <= 16


def test_chat_with_audio_urls_in_both_forms(client: OpenAI, media: MediaHost) -> None:
    greedy = dict(model="qwen2-audio-instruct", max_tokens=12, temperature=0)
    by_input_audio = client.chat.completions.create(**greedy, messages=ask(
        {"type": "input_audio", "input_audio": {"data": media.url("mp3_cbr_en"), "format": "mp3"}}))
    by_audio_url = client.chat.completions.create(**greedy, messages=ask(
        {"type": "audio_url", "audio_url": {"url": media.url("mp3_cbr_en")}}))
    assert by_input_audio.choices[0].message.content == by_audio_url.choices[0].message.content
    assert by_input_audio.usage.prompt_tokens_details.audio_tokens > 25


def test_streaming_with_usage(client: OpenAI, corpus) -> None:  # type: ignore[no-untyped-def]
    part = {"type": "input_audio", "input_audio": {"data": b64(corpus["ogg_opus_zh"].path), "format": "ogg"}}
    whole = client.chat.completions.create(model="qwen-audio-turbo", max_tokens=20, temperature=0, messages=ask(part))
    chunks = list(client.chat.completions.create(model="qwen-audio-turbo", max_tokens=20, temperature=0,
                                                 messages=ask(part), stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    plain = list(client.chat.completions.create(model="qwen-audio-turbo", max_tokens=5, messages=ask(part),
                                                stream=True))
    assert all(c.choices for c in plain)  # no usage chunk unless asked for


def test_text_only_follow_ups_and_compatible_mode(server: LiveServer, corpus) -> None:  # type: ignore[no-untyped-def]
    compat = OpenAI(base_url=server.url + "/compatible-mode/v1", api_key="sk-test", max_retries=0)
    part = {"type": "input_audio", "input_audio": {"data": b64(corpus["flac_en"].path)}}
    messages = [{"role": "system", "content": "Be brief."}, *ask(part),
                {"role": "assistant", "content": "Someone speaks."}, {"role": "user", "content": "In which language?"}]
    r = compat.chat.completions.create(model="qwen-audio-turbo-latest", messages=messages, max_tokens=8)
    assert r.choices[0].message.content is not None
    names = {m.id for m in compat.models.list()}
    assert names >= {"qwen-audio-turbo", "qwen-audio-turbo-latest", "qwen2-audio-instruct"}


def test_chat_errors(client: OpenAI, corpus, engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad_audio = ask({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"<html>").decode()}})
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen-audio-turbo", messages=bad_audio)
    assert e.value.status_code == 400 and e.value.code == "invalid_audio"
    assert e.value.body["message"] == "The audio format is illegal and cannot be opened."
    with pytest.raises(openai.BadRequestError) as e:  # a late system message: refused at the wire, in OpenAI's words
        client.chat.completions.create(model="qwen-audio-turbo", messages=[
            {"role": "user", "content": "Hi"}, {"role": "system", "content": "late"}])
    assert e.value.status_code == 400 and e.value.body["message"] == (
        "A system (or developer) message must come first in messages.")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen-audio-turbo", n=2, messages=[{"role": "user", "content": "hi"}])
    assert "n must be 1" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="whisper-1", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="qwen-audio-turbo", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen-audio-turbo", messages=ask(
            {"type": "audio_url", "audio_url": {"url": "http://169.254.169.254/latest/meta-data/"}}))
    assert e.value.code == "invalid_url"
    with live_server(engine, tmp_path, api_key=("sk-right",)) as locked:
        wrong = OpenAI(base_url=locked.url + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.chat.completions.create(model="qwen-audio-turbo", messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()


# --- transcriptions ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_recording(corpus, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """About 70 s of speech (the corpus' sentences again and again, with short pauses)."""
    pieces = []
    for name in ("wav_pcm_s16_en", "wav_pcm_s16_zh") * 6:
        pieces += [decode_bytes(corpus[name].path.read_bytes()).samples, np.zeros(8000, dtype=np.float32)]
    path = tmp_path_factory.mktemp("long") / "long.wav"
    return C.write_wav(path, np.concatenate(pieces))


def test_transcription_json_and_text(client: OpenAI, corpus) -> None:  # type: ignore[no-untyped-def]
    with open(corpus["mp3_cbr_en"].path, "rb") as f:
        t = client.audio.transcriptions.create(model="qwen-audio-turbo", file=("a.mp3", f), response_format="json")
    assert isinstance(t.text, str)
    with open(corpus["mp3_cbr_en"].path, "rb") as f:
        text = client.audio.transcriptions.create(model="qwen-audio-turbo", file=("a.mp3", f), response_format="text")
    assert isinstance(text, str) and text.strip() == t.text


def test_transcription_subtitles_of_a_long_recording(client: OpenAI, long_recording: Path) -> None:
    samples = decode_bytes(long_recording.read_bytes(), max_samples=10**8).samples
    duration = len(samples) / 16000
    spans = windows(samples)
    assert duration > 60 and len(spans) >= 3
    with open(long_recording, "rb") as f:
        verbose = client.audio.transcriptions.create(model="qwen-audio-turbo", file=f, language="en",
                                                     response_format="verbose_json")
    assert verbose.duration == pytest.approx(duration, abs=0.01) and verbose.language == "english"
    segments = verbose.segments
    assert [(s.start, s.end) for s in segments] == [(round(a / 16000, 3), round(b / 16000, 3)) for a, b in spans]
    assert segments[0].start == 0 and segments[-1].end == pytest.approx(duration, abs=0.01)
    assert all(s.end - s.start <= 30.0 for s in segments)
    assert all(segments[i].end == segments[i + 1].start for i in range(len(segments) - 1))
    with open(long_recording, "rb") as f:
        subtitles = client.audio.transcriptions.create(model="qwen-audio-turbo", file=f, response_format="srt")
    cues = re.findall(r"(\d+)\n(\d\d:\d\d:\d\d,\d\d\d) --> (\d\d:\d\d:\d\d,\d\d\d)\n", subtitles)
    assert [c[0] for c in cues] == [str(i) for i in range(1, len(cues) + 1)] and cues[0][1] == "00:00:00,000"
    with open(long_recording, "rb") as f:
        web = client.audio.transcriptions.create(model="qwen-audio-turbo", file=f, response_format="vtt")
    assert web.startswith("WEBVTT\n\n00:00:00.000 --> ")
    assert len(re.findall(r"\d\d:\d\d:\d\d\.\d\d\d --> \d\d:\d\d:\d\d\.\d\d\d", web)) == len(cues)


def test_translation(client: OpenAI, corpus) -> None:  # type: ignore[no-untyped-def]
    with open(corpus["m4a_aac_zh"].path, "rb") as f:
        t = client.audio.translations.create(model="qwen-audio-turbo", file=("zh.m4a", f))
    assert isinstance(t.text, str)


def test_transcription_errors(client: OpenAI, tmp_path: Path, engine) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model="qwen-audio-turbo", file=("x.wav", b"not audio at all"))
    assert e.value.code == "invalid_audio"
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model="qwen-audio-turbo", file=("x.wav", b"RIFF"), response_format="xml")
    with live_server(engine, tmp_path, max_transcription_s=20.0) as s:
        short_limit = OpenAI(base_url=s.url + "/v1", api_key="k", max_retries=0)
        path = C.write_wav(tmp_path / "long.wav", C.tone(25.0))
        with pytest.raises(openai.BadRequestError) as e, open(path, "rb") as f:
            short_limit.audio.transcriptions.create(model="qwen-audio-turbo", file=f)
        assert "longer than 20s" in e.value.message
