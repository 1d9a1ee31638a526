"""Bad input gets a clear 400 in the protocol's envelope, never a 500 (issue 9 items 8, 9, 17)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.api.conftest import LiveServer, live_server
from tests.origin import Origin, redirect

GENERATION = "/api/v1/services/aigc/multimodal-generation/generation"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(engine, tmp_path_factory.mktemp("home")) as s:
        yield s


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    server = await Origin().start()
    yield server
    await server.close()


def dashscope(audio: str | None, text: str = "What is said?", model: str = "qwen-audio-turbo") -> dict[str, Any]:
    content: list[dict[str, str]] = [{"audio": audio}] if audio else []
    return {"model": model, "input": {"messages": [{"role": "user", "content": [*content, {"text": text}]}]},
            "parameters": {"max_tokens": 2}}


def check_dashscope_400(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    body = r.json()
    assert set(body) >= {"code", "message", "request_id"} and body["request_id"] == r.headers["x-request-id"]
    return body


def check_openai_400(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error


# --- item 9: a malformed redirect Location --------------------------------------------------------------------


@pytest.mark.parametrize("location", ["http:\\\\host\\x", "http://[zz", "http://\x00/", "http://a b:99999999/",
                                      "http://exa mple.com:-1/\x7f"])
async def test_a_malformed_redirect_location_is_a_clear_400(server: LiveServer, origin: Origin, location: str) -> None:
    origin.routes["/moved.wav"] = redirect(location)
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(server.url + GENERATION, json=dashscope(origin.base + "/moved.wav"),
                              headers={"Authorization": "Bearer sk-test"})
        body = check_dashscope_400(r)
        assert "redirect" in body["message"].lower() or body["code"] in ("InvalidURL", "InvalidParameter")
        # the keep-alive connection survives: the next request on the same client is answered
        assert (await client.get(server.url + "/health")).status_code == 200
    assert origin.requests
