"""Keys, quotas and limits as clients meet them: both envelopes, live server, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import LiveServer, live_server, post

GENERATION = "/api/v1/services/aigc/multimodal-generation/generation"


def dashscope_body(wav: str, max_tokens: int = 4) -> dict[str, Any]:
    return {
        "model": "qwen-audio-turbo",
        "input": {"messages": [{"role": "user", "content": [{"audio": wav}, {"text": "What is said?"}]}]},
        "parameters": {"max_tokens": max_tokens, "temperature": 0},
    }


def openai_body(wav: str) -> dict[str, Any]:
    return {
        "model": "qwen-audio-turbo",
        "max_tokens": 4,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": wav}},
                    {"type": "text", "text": "What is said?"},
                ],
            }
        ],
    }


def chat(server: LiveServer, token: str | None, wav: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(server.url + "/v1/chat/completions", json=openai_body(wav), headers=headers, timeout=60)


@pytest.fixture(scope="module")
def wav(corpus) -> str:  # type: ignore[no-untyped-def]
    return "data:;base64," + base64.b64encode(corpus["wav_8k_en"].path.read_bytes()).decode()


def test_once_a_key_exists_every_request_needs_a_valid_one(engine, tmp_path: Path, wav: str) -> None:  # type: ignore[no-untyped-def]
    with live_server(engine, tmp_path, api_key=("sk-static-admin",)) as s:
        assert post(s, dashscope_body(wav), token="sk-static-admin").status_code == 200
        key, info = s.run(s.runtime.store.keys.create(name="alice"))
        assert post(s, dashscope_body(wav), token=key).status_code == 200
        assert chat(s, key, wav).status_code == 200
        assert post(s, dashscope_body(wav), token="sk-static-admin").status_code == 200  # static keys still work
        for token in (None, "sk-ting-forged"):
            r = post(s, dashscope_body(wav), token=token)
            assert (r.status_code, r.json()["code"]) == (401, "InvalidApiKey")
            o = chat(s, token, wav)
            assert (o.status_code, o.json()["error"]["code"], o.json()["error"]["type"]) == (
                401,
                "invalid_api_key",
                "invalid_request_error",
            )
        s.run(s.runtime.store.keys.revoke(info.id))
        r = post(s, dashscope_body(wav), token=key)
        assert (r.status_code, r.json()["message"]) == (401, "Invalid API-key provided.")
        old, _ = s.run(s.runtime.store.keys.create(expires_days=1, now=time.time() - 2 * 86400))
        r = post(s, dashscope_body(wav), token=old)
        assert (r.status_code, r.json()["code"]) == (403, "AccessDenied")
        assert r.json()["message"] == "The API key has expired."


def test_a_spent_quota_in_both_envelopes(engine, tmp_path: Path, wav: str) -> None:  # type: ignore[no-untyped-def]
    with live_server(engine, tmp_path) as s:
        key, _ = s.run(s.runtime.store.keys.create(quota_tokens=50))  # less than one request costs
        r = post(s, dashscope_body(wav), token=key)
        assert (r.status_code, r.json()["code"]) == (403, "AllocationQuota.FreeTierOnly")
        assert r.json()["message"].startswith("The free tier of the model has been exhausted.")
        o = chat(s, key, wav)
        assert (o.status_code, o.json()["error"]["code"], o.json()["error"]["type"]) == (
            429,
            "insufficient_quota",
            "insufficient_quota",
        )


def test_rate_and_concurrency_limits(engine, tmp_path: Path, wav: str) -> None:  # type: ignore[no-untyped-def]
    with live_server(engine, tmp_path) as s:
        key, _ = s.run(s.runtime.store.keys.create(rpm=2))
        if time.time() % 60 > 50:  # keep clear of a boundary (the sliding estimate may let one more in there)
            time.sleep(61 - time.time() % 60)
        statuses = [post(s, dashscope_body(wav), token=key) for _ in range(3)]
        assert [r.status_code for r in statuses] == [200, 200, 429]
        assert statuses[2].json()["code"] == "Throttling.RateQuota"
        assert 1 <= int(statuses[2].headers["retry-after"]) <= 60
        o = chat(s, key, wav)
        assert (o.status_code, o.json()["error"]["code"]) == (429, "rate_limit_exceeded") and o.headers["retry-after"]
        one_at_a_time, _ = s.run(s.runtime.store.keys.create(max_concurrency=1))
        headers = {"Authorization": f"Bearer {one_at_a_time}", "X-DashScope-SSE": "enable"}
        long = dashscope_body(wav, max_tokens=1500)
        long["parameters"].update(temperature=0)  # greedy runs all 1500 tokens on this clip
        with httpx.stream("POST", s.url + GENERATION, json=long, headers=headers, timeout=60) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: dropping the iterator closes the response (a hang-up)
            next(line for line in lines if line.startswith("data:"))  # it is running now
            second = post(s, dashscope_body(wav), token=one_at_a_time)
            assert (second.status_code, second.json()["code"]) == (429, "Throttling")
        deadline = time.monotonic() + 10
        while s.run(s.runtime.store.quota.in_flight()) and time.monotonic() < deadline:
            time.sleep(0.05)  # the first one is aborted and settled after its client hung up
        assert post(s, dashscope_body(wav), token=one_at_a_time).status_code == 200


def test_two_hundred_at_once_against_room_for_exactly_ten(engine, tmp_path: Path, wav: str, database_url: str) -> None:  # type: ignore[no-untyped-def]
    with live_server(engine, tmp_path, database=database_url) as s:
        store = s.runtime.store
        probe, _ = s.run(store.keys.create(name="probe", quota_tokens=None))
        calibration = post(s, dashscope_body(wav), token=probe).json()
        u = calibration["usage"]
        assert calibration["output"]["choices"][0]["finish_reason"] == "length"  # it always uses all 4 tokens
        cost = u["input_tokens"] + u["audio_tokens"] + u["output_tokens"]
        key, info = s.run(store.keys.create(name="ten", quota_tokens=10 * cost))

        async def fire() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=120, limits=limits) as c:
                return await asyncio.gather(
                    *(
                        c.post(s.url + GENERATION, json=dashscope_body(wav), headers={"Authorization": f"Bearer {key}"})
                        for _ in range(200)
                    )
                )

        responses = asyncio.run(fire())
        codes = [r.status_code for r in responses]
        assert codes.count(200) == 10 and codes.count(403) == 190
        assert {r.json()["code"] for r in responses if r.status_code == 403} == {"AllocationQuota.FreeTierOnly"}
        rows = [r for r in s.run(store.ledger.rows()) if r.key_id == info.id]
        assert len(rows) == 200 and len({r.request_id for r in rows}) == 200
        assert sum(r.status == "ok" for r in rows) == 10 and sum(r.status == "refused" for r in rows) == 190
        assert {r.request_id for r in rows} == {r.headers["x-request-id"] for r in responses}
        final = s.run(store.keys.find(info.id))
        assert (final.spent_tokens, final.reserved_tokens) == (10 * cost, 0)
        assert sum(r.charged_tokens for r in rows) == 10 * cost
        assert s.run(store.quota.in_flight()) == 0
