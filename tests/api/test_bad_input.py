"""Bad input gets a clear 400 in the protocol's envelope, never a 500 (issue 9 items 8, 9, 17)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import LiveServer, live_server, wait_for
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
    return {
        "model": model,
        "input": {"messages": [{"role": "user", "content": [*content, {"text": text}]}]},
        "parameters": {"max_tokens": 2},
    }


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


@pytest.mark.parametrize(
    "location",
    ["http:\\\\host\\x", "http://[zz", "http://\x00/", "http://a b:99999999/", "http://exa mple.com:-1/\x7f"],
)
async def test_a_malformed_redirect_location_is_a_clear_400(server: LiveServer, origin: Origin, location: str) -> None:
    origin.routes["/moved.wav"] = redirect(location)
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(
            server.url + GENERATION,
            json=dashscope(origin.base + "/moved.wav"),
            headers={"Authorization": "Bearer sk-test"},
        )
        body = check_dashscope_400(r)
        assert "redirect" in body["message"].lower() or body["code"] in ("InvalidURL", "InvalidParameter")
        # the keep-alive connection survives: the next request on the same client is answered
        assert (await client.get(server.url + "/health")).status_code == 200
    assert origin.requests


# --- item 8: lone surrogates, names the database cannot hold --------------------------------------------------

SURROGATE = '"\\ud800"'  # JSON's escape for a lone UTF-16 surrogate: valid JSON, not a valid Unicode string


def raw_dashscope(model: str = '"qwen-audio-turbo"', text: str = '"hi"') -> bytes:
    return (
        f'{{"model": {model}, "input": {{"messages": [{{"role": "user", "content": [{{"text": {text}}}]}}]}},'
        f' "parameters": {{"max_tokens": 2}}}}'
    ).encode()


def raw_openai(model: str = '"qwen-audio-turbo"', text: str = '"hi"') -> bytes:
    return f'{{"model": {model}, "max_tokens": 2, "messages": [{{"role": "user", "content": {text}}}]}}'.encode()


def access_lines(capture: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in capture.readouterr().out.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("where", ["text", "model"])
def test_a_lone_surrogate_is_a_clear_400_in_each_protocol(
    server: LiveServer, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    headers = {"Authorization": "Bearer sk-test", "Content-Type": "application/json"}
    bad = {where: SURROGATE}
    with caplog.at_level("INFO", logger="ting.access"):
        r = httpx.post(server.url + GENERATION, content=raw_dashscope(**bad), headers=headers, timeout=60)
        body = check_dashscope_400(r)
        assert "surrogate" in body["message"] or "Unicode" in body["message"]
        o = httpx.post(server.url + CHAT, content=raw_openai(**bad), headers=headers, timeout=60)
        error = check_openai_400(o)
        assert "surrogate" in error["message"] or "Unicode" in error["message"]

        def logged(response: httpx.Response) -> bool:  # written once the response is over: wait for it
            lines = [rec.getMessage() for rec in caplog.records if rec.name == "ting.access"]
            return any(response.headers["x-request-id"] in line and '"status": 400' in line for line in lines)

        for response in (r, o):  # the access-log line is kept
            wait_for(lambda response=response: logged(response), "the access-log line")
    # a text with a proper (paired) surrogate escape is an ordinary character
    ok = httpx.post(server.url + CHAT, content=raw_openai(text='"\\ud83d\\ude00"'), headers=headers, timeout=60)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("model", ["q" * 101, "qwen-audio-turbo\u0000", "qwen\nturbo"])
def test_a_model_name_the_database_cannot_hold_is_refused_before_anything_is_stored(
    engine: Any, database_url: str, tmp_path: Path, model: str
) -> None:
    with live_server(engine, tmp_path, database=database_url) as s:
        headers = {"Authorization": "Bearer sk-test"}
        r = httpx.post(s.url + GENERATION, json=dashscope(None, model=model), headers=headers, timeout=60)
        check_dashscope_400(r)
        o = httpx.post(
            s.url + CHAT,
            json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
            headers=headers,
            timeout=60,
        )
        check_openai_400(o)
        t = httpx.post(
            s.url + "/v1/audio/transcriptions",
            data={"model": model},
            files={"file": ("a.wav", b"RIFF0000WAVE")},
            headers=headers,
            timeout=60,
        )
        check_openai_400(t)
        p = httpx.get(s.url + "/api/v1/uploads", params={"action": "getPolicy", "model": model}, headers=headers)
        check_dashscope_400(p)
        # the server is still whole: an ordinary request is answered and recorded
        assert httpx.post(s.url + GENERATION, json=dashscope(None), headers=headers, timeout=60).status_code == 200


# --- item 17: an OpenAI user message with content null ---------------------------------------------------------


@pytest.mark.parametrize("role", ["user", "system"])
def test_an_openai_message_with_null_content_is_a_400(server: LiveServer, role: str) -> None:
    messages = [{"role": role, "content": None}]
    if role == "system":
        messages.append({"role": "user", "content": "hi"})
    r = httpx.post(
        server.url + CHAT,
        json={"model": "qwen-audio-turbo", "max_tokens": 2, "messages": messages},
        headers={"Authorization": "Bearer sk-test"},
        timeout=60,
    )
    error = check_openai_400(r)
    assert "messages[0].content" in error["message"]
    # an assistant turn without content (one that called tools) is still accepted
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "and?"},
    ]
    ok = httpx.post(
        server.url + CHAT,
        json={"model": "qwen-audio-turbo", "max_tokens": 2, "messages": turns},
        headers={"Authorization": "Bearer sk-test"},
        timeout=60,
    )
    assert ok.status_code == 200, ok.text


TRANSCRIBE = "/v1/audio/transcriptions"


@pytest.mark.parametrize(
    ("files", "data", "param", "words"),
    [
        # The form's limits hold before the route runs: one file, 20 fields, 64 KiB a field.
        ([("file", ("a.wav", b"RIFF")), ("file", ("b.wav", b"RIFF"))], {"model": "whisper-1"}, None, "files"),
        ([("file", ("a.wav", b"RIFF"))], {f"f{i}": "x" for i in range(21)} | {"model": "whisper-1"}, None, "fields"),
        ([("file", ("a.wav", b"RIFF"))], {"model": "whisper-1", "prompt": "x" * (64 * 1024 + 1)}, None, "size"),
        # Each field's own rules, named by the field.
        ([], {"model": "whisper-1"}, "file", "Field required"),
        ([("file", ("a.wav", b"RIFF"))], {}, "model", "Field required"),
        ([("file", ("a.wav", b"RIFF"))], {"model": "whisper-1", "response_format": "xml"}, "response_format", "json"),
        ([("file", ("a.wav", b"RIFF"))], {"model": "whisper-1", "stream": "maybe"}, "stream", "bool"),
        ([("file", ("a.wav", b"RIFF"))], {"model": "whisper-1", "language": "english!"}, "language", "ISO-639"),
    ],
)
def test_a_bad_transcription_form_is_a_clear_400(
    server: LiveServer, files: list[Any], data: dict[str, str], param: str | None, words: str
) -> None:
    r = httpx.post(server.url + TRANSCRIBE, files=files, data=data, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"] and "Value error" not in error["message"]


def test_the_transcription_form_is_described_in_openapi(server: LiveServer) -> None:
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    body = spec["paths"][TRANSCRIBE]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    schemas = spec["components"]["schemas"]
    form = schemas[body["$ref"].rsplit("/", 1)[-1]]
    fields = dict(form["properties"])
    for part in form.get("allOf", []):  # the form's fields beside the file: TranscriptionForm
        fields |= schemas[part["$ref"].rsplit("/", 1)[-1]]["properties"]
    assert {"file", "model", "language", "prompt", "response_format", "temperature", "stream"} <= set(fields)
    assert "translate" not in spec["paths"]  # both endpoints are declared by one loop, each under its own path
    assert "post" in spec["paths"]["/v1/audio/translations"]


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("n", 2, "n must be 1"),
        ("temperature", 2.5, "between 0 and 2"),
        ("top_p", 1.5, "between 0 and 1"),
        ("presence_penalty", -3, "between -2 and 2"),
        ("frequency_penalty", 3, "between -2 and 2"),
        ("repetition_penalty", 0, "greater than 0"),
        ("seed", 2**63, "seed must be an integer"),
        ("top_k", -1, "0 (off) or more"),
        ("logprobs", True, "not supported"),
        ("tools", [{"type": "function", "function": {"name": "f"}}], "not supported"),
        ("modalities", ["text", "audio"], "Only text output"),
        ("stop", ["x"] * 5, "at most 4"),
    ],
)
def test_an_openai_parameter_out_of_range_is_named(server: LiveServer, name: str, value: Any, words: str) -> None:
    body = {"model": "qwen2-audio-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, name: value}
    r = httpx.post(server.url + CHAT, json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", name) and words in error["message"]
