"""Hostile inputs over real HTTP: each is refused cheaply, in the protocol's own envelope, and hurts nobody else."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import LiveServer, post

OPENAI_CHAT = "/v1/chat/completions"


def dashscope(text: str = "Hi", **parameters: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "qwen-audio-turbo",
                            "input": {"messages": [{"role": "user", "content": [{"text": text}]}]}}
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


@pytest.mark.parametrize("stop", [[f"s{i}" for i in range(200_000)], [f"s{i}" for i in range(17)], ["x" * 257],
                                  list(range(17)), [-1], [2**40]])
def test_a_dashscope_stop_list_past_its_bounds_is_a_400(server: LiveServer, stop: list[Any]) -> None:
    assert "stop" in dashscope_error(post(server, dashscope(stop=stop)))


@pytest.mark.parametrize("stop", [[f"s{i}" for i in range(16)], ["x" * 256], list(range(16)), "\n\n"])
def test_a_dashscope_stop_list_within_its_bounds_is_served(server: LiveServer, stop: Any) -> None:
    assert post(server, dashscope(stop=stop)).status_code == 200


@pytest.mark.parametrize("stop", [[f"s{i}" for i in range(5)], ["x" * 257], "x" * 257])
def test_an_openai_stop_list_past_its_bounds_is_a_400(server: LiveServer, stop: Any) -> None:
    assert "stop" in openai_error(post(server, openai(stop=stop), path=OPENAI_CHAT))["message"]
