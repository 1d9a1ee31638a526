"""/metrics: Prometheus's text format, read with prometheus-client's own parser after a scripted run; every counter
equals what was sent. Who may read it: the --metrics-key, or anyone on an open server; nobody else once keys exist."""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import LiveServer, MediaHost, live_server, wait_for

GENERATION = "/api/v1/services/aigc/multimodal-generation/generation"
CHAT = "/v1/chat/completions"
METRICS_KEY = "sk-metrics-scraper"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: LiveServer, token: str | None = METRICS_KEY) -> Samples:
    """Every sample of /metrics as parsed by prometheus-client: {(name, sorted labels): value}."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(server.url + "/metrics", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def counted(samples: Samples) -> float:
    """Requests counted on the two protocols' routes (not the scrapes of /metrics)."""
    return sum(total(samples, "ting_requests_total", protocol=p) for p in ("dashscope", "openai"))


def dashscope_body(audio: str, max_tokens: int = 4) -> dict[str, Any]:
    return {
        "model": "qwen-audio-turbo",
        "input": {"messages": [{"role": "user", "content": [{"audio": audio}, {"text": "What is said?"}]}]},
        "parameters": {"max_tokens": max_tokens, "temperature": 0},
    }


def openai_body(audio: str, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "qwen-audio-turbo",
        "max_tokens": 4,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": audio}},
                    {"type": "text", "text": "What is said?"},
                ],
            }
        ],
    }
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


class Script:
    """Sends requests and keeps what the responses said: statuses by protocol, usage as the responses reported it."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.tokens: Counter[tuple[str, str]] = Counter()  # (protocol, text | audio | output)
        self.output_tokens: dict[str, list[int]] = {"dashscope": [], "openai": []}  # per ok chat request

    def _headers(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _count(self, protocol: str, text: int, audio: int, output: int, chat: bool = True) -> None:
        self.tokens[protocol, "text"] += text
        self.tokens[protocol, "audio"] += audio
        self.tokens[protocol, "output"] += output
        if chat:
            self.output_tokens[protocol].append(output)

    def dashscope(self, token: str | None, audio: str, stream: bool = False) -> int:
        headers = self._headers(token)
        if not stream:
            r = httpx.post(self.server.url + GENERATION, json=dashscope_body(audio), headers=headers, timeout=120)
            if r.status_code == 200:
                u = r.json()["usage"]
                self._count("dashscope", u["input_tokens"], u["audio_tokens"], u["output_tokens"])
            return r.status_code
        headers["X-DashScope-SSE"] = "enable"
        with httpx.stream(
            "POST", self.server.url + GENERATION, json=dashscope_body(audio), headers=headers, timeout=120
        ) as r:
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
        if r.status_code == 200:
            u = events[-1]["usage"]  # running totals: the last event's are the request's
            self._count("dashscope", u["input_tokens"], u["audio_tokens"], u["output_tokens"])
        return r.status_code

    def openai(self, token: str | None, audio: str, stream: bool = False) -> int:
        url, headers = self.server.url + CHAT, self._headers(token)
        if not stream:
            r = httpx.post(url, json=openai_body(audio), headers=headers, timeout=120)
            if r.status_code == 200:
                self._openai_usage(r.json()["usage"])
            return r.status_code
        with httpx.stream("POST", url, json=openai_body(audio, stream=True), headers=headers, timeout=120) as r:
            lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        if r.status_code == 200:
            assert lines[-1] == "[DONE]"
            self._openai_usage(json.loads(lines[-2])["usage"])  # include_usage: the chunk before [DONE]
        return r.status_code

    def _openai_usage(self, u: dict[str, Any], chat: bool = True) -> None:
        details = u["prompt_tokens_details"]
        assert u["prompt_tokens"] == details["text_tokens"] + details["audio_tokens"]
        self._count("openai", details["text_tokens"], details["audio_tokens"], u["completion_tokens"], chat)

    def transcription(self, token: str, recording: bytes) -> int:
        r = httpx.post(
            self.server.url + "/v1/audio/transcriptions",
            data={"model": "qwen-audio-turbo", "response_format": "json"},
            files={"file": ("a.wav", recording)},
            headers=self._headers(token),
            timeout=120,
        )
        if r.status_code == 200:
            u = r.json()["usage"]
            details = u["input_token_details"]
            self._count("openai", details["text_tokens"], details["audio_tokens"], u["output_tokens"], chat=False)
        return r.status_code


@pytest.fixture(scope="module")
def recording(corpus) -> bytes:  # type: ignore[no-untyped-def]
    data: bytes = corpus["wav_8k_en"].path.read_bytes()
    return data


def test_after_a_scripted_run_the_counters_equal_what_was_sent(
    engine: Any, tmp_path: Path, recording: bytes, media: MediaHost
) -> None:
    wav = "data:;base64," + base64.b64encode(recording).decode()
    with live_server(engine, tmp_path, metrics_key=METRICS_KEY) as s:
        good, _ = s.run(s.runtime.store.keys.create(name="good"))
        spent, _ = s.run(s.runtime.store.keys.create(name="spent", quota_tokens=0))  # refused at admission
        small, _ = s.run(s.runtime.store.keys.create(name="small", quota_tokens=5))  # refused at the reservation
        slow, _ = s.run(s.runtime.store.keys.create(name="slow", rpm=1))  # one request a minute
        script = Script(s)
        statuses: Counter[tuple[str, int]] = Counter()
        for stream in (False, False, True):
            statuses["dashscope", script.dashscope(good, wav, stream)] += 1
            statuses["openai", script.openai(good, wav, stream)] += 1
        statuses["openai", script.transcription(good, recording)] += 1
        statuses["dashscope", script.dashscope(spent, wav)] += 1
        statuses["openai", script.openai(spent, wav, stream=True)] += 1
        statuses["dashscope", script.dashscope(small, wav)] += 1
        statuses["openai", script.openai(slow, wav)] += 1
        statuses["openai", script.openai(slow, wav, stream=True)] += 1  # the second in a minute: refused
        for token in (None, "sk-ting-forged"):
            statuses["dashscope", script.dashscope(token, wav, stream=True)] += 1
            statuses["openai", script.openai(token, wav)] += 1
        models = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer sk-ting-forged"}, timeout=30)
        statuses["openai", models.status_code] += 1  # refused without ever reaching the request lifecycle
        statuses["dashscope", script.dashscope(good, media.url("missing.wav"))] += 1  # the fetch fails
        not_audio = "data:;base64," + base64.b64encode(b"this is not audio, only text " * 8).decode()
        statuses["openai", script.openai(good, not_audio)] += 1  # the decode fails
        assert statuses == Counter(
            {
                ("dashscope", 200): 3,
                ("openai", 200): 5,
                ("dashscope", 403): 2,  # quota: at admission, at the reservation
                ("openai", 429): 2,  # quota, in OpenAI's words (insufficient_quota); rate
                ("dashscope", 401): 2,
                ("openai", 401): 3,
                ("dashscope", 400): 1,
                ("openai", 400): 1,
            }
        )
        sent = sum(statuses.values())
        # The client can read a response before the server has finished counting it: wait until all are in.
        wait_for(lambda: counted(scrape(s)) >= sent, "every request counted")
        m = scrape(s)
        cache = httpx.get(s.url + "/health", timeout=30).json()["cache"]  # the engine's caches, nothing run since

    for (protocol, status), n in statuses.items():
        assert total(m, "ting_requests_total", protocol=protocol, status=str(status)) == n, (protocol, status)
    assert total(m, "ting_requests_total", endpoint=GENERATION, outcome="ok") == 3
    assert total(m, "ting_requests_total", endpoint=CHAT, outcome="ok") == 4
    assert total(m, "ting_requests_total", endpoint="/v1/audio/transcriptions", outcome="ok") == 1
    assert total(m, "ting_requests_total", endpoint=GENERATION, outcome="refused") == 4
    assert total(m, "ting_requests_total", endpoint=CHAT, outcome="refused") == 4
    assert total(m, "ting_requests_total", endpoint="/v1/models", status="401", outcome="refused") == 1
    assert total(m, "ting_requests_total", outcome="error", status="400") == 2
    # refusals by reason
    assert total(m, "ting_requests_refused_total", protocol="dashscope", reason="quota") == 2
    assert total(m, "ting_requests_refused_total", protocol="openai", reason="quota") == 1
    assert total(m, "ting_requests_refused_total", protocol="dashscope", reason="auth") == 2
    assert total(m, "ting_requests_refused_total", protocol="openai", reason="auth") == 3
    assert total(m, "ting_requests_refused_total", protocol="openai", reason="rate") == 1
    assert total(m, "ting_requests_refused_total") == 9
    # tokens: exactly the usage the responses reported (refused and failed requests ran nothing)
    for protocol in ("dashscope", "openai"):
        for modality in ("text", "audio"):
            reported = script.tokens[protocol, modality]
            assert total(m, "ting_prompt_tokens_total", protocol=protocol, modality=modality) == reported > 0
        reported = script.tokens[protocol, "output"]
        assert total(m, "ting_generation_tokens_total", protocol=protocol) == reported > 0
    # histograms: one observation per request the lifecycle settled (ok, the reservation refusal, the two failures)
    e2e = "ting_e2e_request_latency_seconds_count"
    assert total(m, e2e, protocol="dashscope", outcome="ok") == 3
    assert total(m, e2e, protocol="openai", outcome="ok") == 5
    assert total(m, e2e, protocol="dashscope", outcome="refused") == 1
    assert total(m, e2e, outcome="error") == 2
    assert total(m, e2e) == 11
    for protocol in ("dashscope", "openai"):
        chats = script.output_tokens[protocol]
        assert total(m, "ting_time_to_first_token_seconds_count", protocol=protocol) == len(chats)
        several = sum(1 for n in chats if n >= 2)
        assert total(m, "ting_time_per_output_token_seconds_count", protocol=protocol) == several
    assert len(script.output_tokens["dashscope"]) == 3 and len(script.output_tokens["openai"]) == 4
    # audio: 7 good chats, the reservation refusal and the decode failure read a data: URI; one download failed
    assert total(m, "ting_audio_fetch_duration_seconds_count", source="data") == 9
    assert total(m, "ting_audio_fetch_duration_seconds_count", source="http") == 1
    assert total(m, "ting_audio_fetch_failures_total", source="http") == 1
    assert total(m, "ting_audio_fetch_failures_total") == 1
    # Of those 9, the clips decoded before (same key, same bytes) came from the cache; the transcription's file is
    # never kept: decoded are the cache's misses and that file.
    hits, misses = total(m, "ting_audio_cache_hits_total"), total(m, "ting_audio_cache_misses_total")
    assert hits + misses == 9 and hits >= 1
    assert total(m, "ting_audio_decode_duration_seconds_count") == misses + 1
    assert total(m, "ting_audio_cache_entries") >= 1 and total(m, "ting_audio_cache_size_bytes") > 0
    assert total(m, "ting_audio_decode_failures_total") == 1
    # the engine's live state
    assert total(m, "ting_num_requests_running") == total(m, "ting_num_requests_waiting") == 0
    assert total(m, "ting_kv_slots_used") == 0 and total(m, "ting_kv_slots_total") == 8  # the test engine's
    assert total(m, "ting_engine_up") == 1 and total(m, "ting_engine_restarts_total") == 0
    # the engine's caches, as /health shows them
    assert total(m, "ting_prefix_cache_hits_total") == cache["prefix_hits"]
    assert total(m, "ting_prefix_cache_reused_tokens_total") == cache["prefix_cached_tokens"]
    assert total(m, "ting_encoder_cache_entries") == cache["encoder_entries"] > 0


def test_who_may_read_the_metrics(engine: Any, tmp_path: Path, server: LiveServer) -> None:
    # An open server (no key anywhere) answers anyone (and, being open, only to loopback Host names).
    assert total(scrape(server, token=None), "ting_engine_up") == 1
    # Once keys exist and no --metrics-key is set: nobody, not even a valid API key (a client's key).
    with live_server(engine, tmp_path / "a", api_key=("sk-static-admin",)) as s:
        key, _ = s.run(s.runtime.store.keys.create(name="alice"))
        for token in (None, "sk-static-admin", key):
            r = httpx.get(s.url + "/metrics", headers={"Authorization": f"Bearer {token}"} if token else {})
            assert (r.status_code, r.json()["code"]) == (403, "AccessDenied"), token
            assert "--metrics-key" in r.json()["message"]
    # With --metrics-key: that key only.
    with live_server(engine, tmp_path / "b", api_key=("sk-static-admin",), metrics_key=METRICS_KEY) as s:
        key, _ = s.run(s.runtime.store.keys.create(name="alice"))
        for token in (None, "sk-static-admin", key, METRICS_KEY + "x"):
            r = httpx.get(s.url + "/metrics", headers={"Authorization": f"Bearer {token}"} if token else {})
            assert (r.status_code, r.json()["code"]) == (401, "InvalidApiKey"), token
        assert total(scrape(s), "ting_engine_up") == 1


def test_a_full_engine_queue_is_an_overload_refusal(tiny_dir: Path, tmp_path: Path, recording: bytes) -> None:
    from ting.engine import Engine

    full = Engine.load(str(tiny_dir), max_batch_size=1, max_queue=0)  # every request finds the queue full
    full.start()
    try:
        with live_server(full, tmp_path) as s:
            wav = "data:;base64," + base64.b64encode(recording).decode()
            statuses = [Script(s).dashscope(None, wav), Script(s).openai(None, wav, stream=True)]
            assert statuses == [503, 503]
            wait_for(lambda: counted(scrape(s, token=None)) >= 2, "both requests counted")
            m = scrape(s, token=None)
    finally:
        full.stop()
    for protocol in ("dashscope", "openai"):
        assert total(m, "ting_requests_refused_total", protocol=protocol, reason="overload") == 1
        assert total(m, "ting_requests_total", protocol=protocol, status="503", outcome="refused") == 1
        assert total(m, "ting_prompt_tokens_total", protocol=protocol) == 0
    assert total(m, "ting_kv_slots_total") == 1
