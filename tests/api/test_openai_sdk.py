"""The official openai Python SDK against a live server: chat with audio, and Whisper-style transcripts."""

from __future__ import annotations

import base64
import json
import math
import re
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI

from tests import corpus as C
from tests.api.conftest import LiveServer, MediaHost, live_server
from tests.api.test_dashscope_http import slow_down_steps
from ting.audio.decode import decode_bytes
from ting.audio.tokens import billed_audio_tokens
from ting.service.language import ANSWER_SAMPLING, language_from_answer, question, whisper_name
from ting.service.transcription import windows
from ting.types import AudioClip


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
    r = client.chat.completions.create(
        model="qwen-audio-turbo",
        max_tokens=16,
        temperature=0,
        messages=ask({"type": "input_audio", "input_audio": {"data": b64(path), "format": "wav"}}),
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens_details.audio_tokens == billed(path)
    assert u.prompt_tokens == u.prompt_tokens_details.audio_tokens + u.prompt_tokens_details.text_tokens
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and 1 <= u.completion_tokens <= 16


def test_chat_with_audio_urls_in_both_forms(client: OpenAI, media: MediaHost) -> None:
    greedy = dict(model="qwen2-audio-instruct", max_tokens=12, temperature=0)
    by_input_audio = client.chat.completions.create(
        **greedy,
        messages=ask({"type": "input_audio", "input_audio": {"data": media.url("mp3_cbr_en"), "format": "mp3"}}),
    )
    by_audio_url = client.chat.completions.create(
        **greedy, messages=ask({"type": "audio_url", "audio_url": {"url": media.url("mp3_cbr_en")}})
    )
    assert by_input_audio.choices[0].message.content == by_audio_url.choices[0].message.content
    assert by_input_audio.usage.prompt_tokens_details.audio_tokens > 25


def test_streaming_with_usage(client: OpenAI, corpus) -> None:  # type: ignore[no-untyped-def]
    part = {"type": "input_audio", "input_audio": {"data": b64(corpus["ogg_opus_zh"].path), "format": "ogg"}}
    whole = client.chat.completions.create(model="qwen-audio-turbo", max_tokens=20, temperature=0, messages=ask(part))
    chunks = list(
        client.chat.completions.create(
            model="qwen-audio-turbo",
            max_tokens=20,
            temperature=0,
            messages=ask(part),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    plain = list(
        client.chat.completions.create(model="qwen-audio-turbo", max_tokens=5, messages=ask(part), stream=True)
    )
    assert all(c.choices for c in plain)  # no usage chunk unless asked for


def test_text_only_follow_ups_and_compatible_mode(server: LiveServer, corpus) -> None:  # type: ignore[no-untyped-def]
    compat = OpenAI(base_url=server.url + "/compatible-mode/v1", api_key="sk-test", max_retries=0)
    part = {"type": "input_audio", "input_audio": {"data": b64(corpus["flac_en"].path)}}
    messages = [
        {"role": "system", "content": "Be brief."},
        *ask(part),
        {"role": "assistant", "content": "Someone speaks."},
        {"role": "user", "content": "In which language?"},
    ]
    r = compat.chat.completions.create(model="qwen-audio-turbo-latest", messages=messages, max_tokens=8)
    assert r.choices[0].message.content is not None
    names = {m.id for m in compat.models.list()}
    assert names >= {"qwen-audio-turbo", "qwen-audio-turbo-latest", "qwen2-audio-instruct"}


def test_a_follow_up_reports_the_reused_prompt_tokens(client: OpenAI, server: LiveServer, corpus) -> None:  # type: ignore[no-untyped-def]
    """The SDK resends the whole history; the engine reuses the first turn's keys and values (the audio with
    them), and says so as OpenAI does: usage.prompt_tokens_details.cached_tokens, part of prompt_tokens."""
    part = {"type": "input_audio", "input_audio": {"data": b64(corpus["wav_pcm_s16_zh"].path), "format": "wav"}}
    first = client.chat.completions.create(model="qwen-audio-turbo", max_tokens=6, temperature=0, messages=ask(part))
    follow = [
        *ask(part),
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And who is speaking?"},
    ]
    second = client.chat.completions.create(model="qwen-audio-turbo", max_tokens=6, temperature=0, messages=follow)
    u = second.usage
    assert u.prompt_tokens_details.audio_tokens == first.usage.prompt_tokens_details.audio_tokens  # billed the same
    assert first.usage.prompt_tokens_details.audio_tokens < u.prompt_tokens_details.cached_tokens < u.prompt_tokens
    cache = httpx.get(server.url + "/health").json()["cache"]  # the engine's counters, for operators
    assert cache["prefix_hits"] >= 1 and cache["prefix_cached_tokens"] >= u.prompt_tokens_details.cached_tokens
    assert cache["encoder_entries"] >= 1 and cache["encoder_bytes"] > 0


def test_chat_errors(client: OpenAI, corpus, engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad_audio = ask({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"<html>").decode()}})
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen-audio-turbo", messages=bad_audio)
    assert e.value.status_code == 400 and e.value.code == "invalid_audio"
    assert e.value.body["message"] == "The audio format is illegal and cannot be opened."
    with pytest.raises(openai.BadRequestError) as e:  # a late system message: refused at the wire, in OpenAI's words
        client.chat.completions.create(
            model="qwen-audio-turbo",
            messages=[{"role": "user", "content": "Hi"}, {"role": "system", "content": "late"}],
        )
    assert e.value.status_code == 400 and e.value.body["message"] == (
        "A system (or developer) message must come first in messages."
    )
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen-audio-turbo", n=2, messages=[{"role": "user", "content": "hi"}])
    assert "n must be 1" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="whisper-1", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="qwen-audio-turbo",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}],
        )
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="qwen-audio-turbo",
            messages=ask({"type": "audio_url", "audio_url": {"url": "http://169.254.169.254/latest/meta-data/"}}),
        )
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
        verbose = client.audio.transcriptions.create(
            model="qwen-audio-turbo", file=f, language="en", response_format="verbose_json"
        )
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


# --- what Whisper-API and OpenAI clients reach for (issue 10) ------------------------------------------------------


def ledger_rows(server: LiveServer, request_id: str) -> list:  # type: ignore[type-arg]
    return [r for r in server.run(server.runtime.store.ledger.rows()) if r.request_id == request_id]


def test_streaming_transcription_yields_deltas_then_done(client: OpenAI, long_recording: Path) -> None:
    with open(long_recording, "rb") as f:
        whole = client.audio.transcriptions.create(model="qwen-audio-turbo", file=f, language="en")
    with open(long_recording, "rb") as f:
        events = list(client.audio.transcriptions.create(model="qwen-audio-turbo", file=f, language="en", stream=True))
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done" and set(kinds[:-1]) == {"transcript.text.delta"}
    assert len(kinds) >= 3  # the recording has three windows or more: deltas come window by window
    done = events[-1]
    assert "".join(e.delta for e in events[:-1]) == done.text == whole.text
    assert done.usage.type == "tokens" and done.usage.input_token_details.audio_tokens > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    assert done.usage.output_tokens == whole.usage.output_tokens


@pytest.mark.parametrize(
    "path",
    [
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/compatible-mode/v1/audio/transcriptions",
        "/compatible-mode/v1/audio/translations",
    ],
)
def test_streaming_transcription_on_the_wire(server: LiveServer, corpus, path: str) -> None:  # type: ignore[no-untyped-def]
    form = {"model": "whisper-1", "stream": "true", "temperature": "0"}
    audio = corpus["wav_pcm_s16_en"].path.read_bytes()
    plain = httpx.post(
        server.url + path,
        data={**form, "stream": "false"},
        files={"file": ("a.wav", audio)},
        headers={"Authorization": "Bearer sk-test"},
        timeout=120,
    )
    r = httpx.post(
        server.url + path,
        data=form,
        files={"file": ("a.wav", audio)},
        headers={"Authorization": "Bearer sk-test"},
        timeout=120,
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in r.text.split("\n\n") if f and not f.startswith(":")]
    assert all(f.startswith("data: ") and "\n" not in f for f in frames)
    events = [json.loads(f[6:]) for f in frames]
    assert events[-1]["type"] == "transcript.text.done" and events[-1]["text"] == plain.json()["text"]
    assert [e["type"] for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1)
    assert "".join(e["delta"] for e in events[:-1]) == events[-1]["text"]
    rows = ledger_rows(server, r.headers["x-request-id"])  # admitted, reserved and settled as any request
    assert [(row.status, row.output_tokens) for row in rows] == [("ok", events[-1]["usage"]["output_tokens"])]
    assert rows[0].audio_tokens == events[-1]["usage"]["input_token_details"]["audio_tokens"]


def test_streaming_transcription_errors_come_before_the_stream(client: OpenAI, server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model="whisper-1", file=("x.wav", b"not audio at all"), stream=True)
    assert e.value.status_code == 400 and e.value.code == "invalid_audio"
    r = httpx.post(
        server.url + "/v1/audio/transcriptions",
        data={"model": "whisper-1", "stream": "true", "response_format": "srt"},
        files={"file": ("a.wav", b"RIFF")},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"


def test_a_streaming_transcription_whose_client_hangs_up_is_settled_once(
    engine, tmp_path: Path, corpus, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    with live_server(engine, tmp_path) as s:
        slow_down_steps(engine, monkeypatch, 0.2)  # no window can be done before the client gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                s.url + "/v1/audio/transcriptions",
                data={"model": "whisper-1", "stream": "true"},
                files={"file": ("a.wav", corpus["wav_pcm_s16_en"].path.read_bytes())},
                timeout=httpx.Timeout(60, read=0.5),
            )
        deadline = time.monotonic() + 60
        while not s.run(s.runtime.store.ledger.rows()) and time.monotonic() < deadline:
            time.sleep(0.05)
        rows = s.run(s.runtime.store.ledger.rows())
        assert [(r.status, r.error_code) for r in rows] == [("aborted", "ClientClosedRequest")]
        assert s.run(s.runtime.store.quota.in_flight()) == 0


def test_models_retrieve(client: OpenAI, server: LiveServer) -> None:
    m = client.models.retrieve("qwen-audio-turbo")
    assert (m.id, m.object, m.owned_by) == ("qwen-audio-turbo", "model", "ting")
    compat = OpenAI(base_url=server.url + "/compatible-mode/v1", api_key="sk-test", max_retries=0)
    assert compat.models.retrieve("qwen2-audio-tiny").id == "qwen2-audio-tiny"
    for c in (client, compat):
        with pytest.raises(openai.NotFoundError) as e:
            c.models.retrieve("gpt-5")
        assert e.value.status_code == 404
        assert (e.value.code, e.value.type, e.value.param) == ("model_not_found", "invalid_request_error", "model")
        assert "gpt-5" in e.value.message


def test_unknown_models_are_404_model_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert (e.value.code, e.value.type, e.value.param) == ("model_not_found", "invalid_request_error", "model")
    with pytest.raises(openai.NotFoundError) as e:
        client.audio.transcriptions.create(model="no-such-model", file=("a.wav", b"RIFF0000WAVE"))
    assert (e.value.code, e.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.NotFoundError):  # a transcription model's name is no chat model
        client.chat.completions.create(model="whisper-1", messages=[{"role": "user", "content": "hi"}])


def test_errors_speak_openai_vocabulary(client: OpenAI, server: LiveServer) -> None:
    hi = [{"role": "user", "content": "hi"}]
    cases = [
        (dict(temperature=3), "temperature"),
        (dict(n=2), "n"),
        (dict(max_tokens=100000), "max_tokens"),
        (dict(top_p=1.5), "top_p"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="qwen-audio-turbo", messages=hi, **extra)
        assert (e.value.type, e.value.code, e.value.param) == ("invalid_request_error", "invalid_value", param)
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "qwen-audio-turbo", "messages": "hi"},
        headers={"Authorization": "Bearer sk-test"},
    )
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "messages" and error["code"] == "invalid_value"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{nope", headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_json")
    dashscope_names = {"InvalidParameter", "BadRequest.IllegalInput", "InvalidURL", "Throttling"}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen-audio-turbo", messages=[{"role": "robot", "content": "hi"}])
    assert e.value.code not in dashscope_names and e.value.param == "messages[0].role"


@pytest.mark.parametrize("name", ["whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe"])
def test_openai_transcription_model_names(client: OpenAI, corpus, name: str) -> None:  # type: ignore[no-untyped-def]
    path = corpus["mp3_cbr_en"].path
    own = client.audio.transcriptions.create(model="qwen2-audio-tiny", file=("a.mp3", path.read_bytes()), temperature=0)
    t = client.audio.transcriptions.create(model=name, file=("a.mp3", path.read_bytes()), temperature=0)
    assert t.text == own.text  # the served model, under OpenAI's name
    if name == "whisper-1":  # whisper-1 bills by duration, and says so
        seconds = len(decode_bytes(path.read_bytes()).samples) / 16000
        assert (t.usage.type, t.usage.seconds) == ("duration", math.ceil(seconds))
    else:
        assert t.usage.type == "tokens" and t.usage.output_tokens == own.usage.output_tokens
    translated = client.audio.translations.create(model=name, file=("a.mp3", path.read_bytes()))
    assert isinstance(translated.text, str)


def test_word_timestamps_are_refused_and_segments_given(client: OpenAI, corpus) -> None:  # type: ignore[no-untyped-def]
    data = corpus["wav_pcm_s16_en"].path.read_bytes()
    for granularities in (["word"], ["word", "segment"]):
        with pytest.raises(openai.BadRequestError) as e:
            client.audio.transcriptions.create(
                model="whisper-1",
                file=("a.wav", data),
                language="en",
                response_format="verbose_json",
                timestamp_granularities=granularities,
            )
        assert e.value.param == "timestamp_granularities" and "Word timestamps are not available" in e.value.message
    t = client.audio.transcriptions.create(
        model="whisper-1",
        file=("a.wav", data),
        language="en",
        response_format="verbose_json",
        timestamp_granularities=["segment"],
    )
    assert t.segments and t.words is None


def test_transcription_form_values_are_checked_at_the_wire(client: OpenAI, corpus) -> None:  # type: ignore[no-untyped-def]
    data = corpus["wav_pcm_s16_en"].path.read_bytes()
    for extra, param, message in (
        ({"language": "english!"}, "language", "ISO-639"),
        ({"temperature": 1.5}, "temperature", "between 0 and 1"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.audio.transcriptions.create(model="whisper-1", file=("a.wav", data), **extra)
        assert e.value.param == param and message in e.value.message


def test_verbose_json_usage_is_duration_and_language_is_detected(client: OpenAI, server: LiveServer, corpus) -> None:  # type: ignore[no-untyped-def]
    data = corpus["wav_pcm_s16_zh"].path.read_bytes()
    hinted = client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("a.wav", data), language="zh", response_format="verbose_json", temperature=0
    )
    t = hinted.parse()
    assert t.language == "chinese"  # the hint, as Whisper names it
    assert (t.usage.type, t.usage.seconds) == ("duration", math.ceil(t.duration))
    asked = client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("a.wav", data), response_format="verbose_json", temperature=0
    )
    detected = asked.parse()
    expected = language_from_answer(server.run(_ask_language(server, data)))
    assert detected.language == expected
    # The question is a real part of the request: one ledger row, with the answer's tokens in it (json asks nothing).
    plain = client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("a.wav", data), response_format="json", temperature=0
    )
    (plain_row,) = ledger_rows(server, plain.headers["x-request-id"])
    (asked_row,) = ledger_rows(server, asked.headers["x-request-id"])
    assert plain.parse().text == detected.text
    assert asked_row.status == "ok" and asked_row.audio_tokens == 2 * plain_row.audio_tokens
    assert 1 <= asked_row.output_tokens - plain_row.output_tokens <= ANSWER_SAMPLING.max_tokens


async def _ask_language(server: LiveServer, data: bytes) -> str:
    engine = server.runtime.engine
    decoded = decode_bytes(data)
    clip = AudioClip(decoded.samples, None, False, "wav", "pcm_s16le")
    prompt = await engine.prepare(question(clip))
    out = [c.text async for c in engine.generate(prompt, engine.resolve(ANSWER_SAMPLING, prompt))]
    return "".join(out)


@pytest.mark.parametrize(
    ("answer", "name"),
    [
        ("The language is English.", "english"),
        ("English", "english"),
        ("这段音频是中文。", "chinese"),
        ("Mandarin Chinese", "chinese"),
        ("粤语", "cantonese"),
        ("It is spoken in French, not German.", "french"),
        ("Haitian Creole", "haitian creole"),
        ("ăĸ!!zz qwe", "unknown"),
        ("", "unknown"),
        ("it is a recording of someone", "unknown"),  # "it" is no language code here
    ],
)
def test_the_model_answer_maps_to_whisper_names(answer: str, name: str) -> None:
    assert language_from_answer(answer) == name


def test_language_hints_map_to_whisper_names() -> None:
    assert [whisper_name(c) for c in ("en", "zh", "yue", "zh-CN", "EN", None)] == [
        "english",
        "chinese",
        "cantonese",
        "chinese",
        "english",
        "unknown",
    ]
