"""The DashScope wire, byte by byte: bodies, SSE frames, error envelopes, models, limits, uploads."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import corpus as C
from tests.api.conftest import LiveServer, MediaHost, hang_up_when, live_server, post, wait_for
from ting.api.dashscope import uploads

EVENT = re.compile(r"id:(\d+)\nevent:(result|error)\n:HTTP_STATUS/(\d+)\ndata:(.*)\n\n")


def data_uri(path: Path, mime: str = "") -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def request(
    audio: str | None, text: str | None = "What is said?", model: str = "qwen-audio-turbo", **parameters: Any
) -> dict[str, Any]:
    content: list[dict[str, str]] = []
    if audio is not None:
        content.append({"audio": audio})
    if text is not None:
        content.append({"text": text})
    body: dict[str, Any] = {"model": model, "input": {"messages": [{"role": "user", "content": content}]}}
    if parameters:
        body["parameters"] = parameters
    return body


def events(raw: str) -> list[tuple[int, str, int, dict[str, Any]]]:
    """Parse an SSE body strictly: it must be nothing but DashScope-framed events (and keep-alive comments)."""
    body = raw.replace(":keepalive\n\n", "")
    found = [(int(i), kind, int(status), json.loads(data)) for i, kind, status, data in EVENT.findall(body)]
    assert EVENT.sub("", body) == "", f"unexpected bytes in the stream: {EVENT.sub('', body)!r}"
    return found


@pytest.fixture(scope="module")
def wav(corpus) -> str:  # type: ignore[no-untyped-def]
    return data_uri(corpus["wav_pcm_s16_en"].path)


# --- success ----------------------------------------------------------------------------------------------------


def test_the_non_stream_body_is_the_documented_shape(server: LiveServer, wav: str) -> None:
    r = post(server, request(wav, temperature=0, max_tokens=16))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["output", "usage", "request_id"]
    assert list(body["output"]) == ["choices"] and len(body["output"]["choices"]) == 1
    choice = body["output"]["choices"][0]
    assert list(choice) == ["finish_reason", "message"] and choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["role"] == "assistant"
    assert list(choice["message"]["content"][0]) == ["text"]
    assert list(body["usage"]) == ["audio_tokens", "output_tokens", "input_tokens"]
    assert body["usage"]["audio_tokens"] == 127 and 1 <= body["usage"]["output_tokens"] <= 16
    assert r.headers["x-request-id"] == body["request_id"]
    assert "status_code" not in body


@pytest.mark.parametrize("incremental", [True, False, None])
def test_the_stream_is_framed_exactly_as_dashscope_frames_it(
    server: LiveServer, wav: str, incremental: bool | None
) -> None:
    params: dict[str, Any] = dict(temperature=0, max_tokens=20)
    if incremental is not None:
        params["incremental_output"] = incremental
    whole = post(server, request(wav, **params)).json()["output"]["choices"][0]["message"]["content"][0]["text"]
    r = post(server, request(wav, **params), stream=True)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream;charset=UTF-8"
    assert "[DONE]" not in r.text and "event: " not in r.text and "data: " not in r.text
    found = events(r.text)
    assert [e[0] for e in found] == list(range(1, len(found) + 1))
    assert all(kind == "result" and status == 200 for _, kind, status, _ in found)
    datas = [d for *_, d in found]
    assert len({d["request_id"] for d in datas}) == 1 and datas[0]["request_id"] == r.headers["x-request-id"]
    reasons = [d["output"]["choices"][0]["finish_reason"] for d in datas]
    assert reasons[:-1] == ["null"] * (len(reasons) - 1) and reasons[-1] in ("stop", "length")
    contents = [d["output"]["choices"][0]["message"]["content"] for d in datas]
    if incremental:  # deltas, then a last event with no content at all, as the hosted API ends the stream
        assert contents[-1] == [] and all(c for c in contents[:-1])
        assert "".join(c[0]["text"] for c in contents[:-1]) == whole
    else:  # false or absent: every event carries the whole text so far, the last one too
        texts = [c[0]["text"] for c in contents]
        assert texts[-1] == whole and all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    usages = [d["usage"] for d in datas]
    assert all(list(u) == ["input_tokens", "output_tokens", "audio_tokens"] for u in usages)
    assert [u["output_tokens"] for u in usages] == sorted(u["output_tokens"] for u in usages)
    assert len({(u["input_tokens"], u["audio_tokens"]) for u in usages}) == 1
    for line in r.text.splitlines():  # every data line is a single line of JSON
        if line.startswith("data:"):
            json.loads(line[5:])


def test_the_last_incremental_event_carries_empty_content_byte_for_byte(server: LiveServer, wav: str) -> None:
    r = post(server, request(wav, temperature=0, max_tokens=20, incremental_output=True), stream=True)
    frames = r.text.replace(":keepalive\n\n", "").split("\n\n")
    assert frames[-1] == ""  # the body ends with a whole event
    last = frames[-2]
    data = json.loads(last.split("\ndata:", 1)[1])
    usage = data["usage"]
    reason = data["output"]["choices"][0]["finish_reason"]
    assert reason in ("stop", "length")
    assert last == (
        f"id:{len(frames) - 1}\nevent:result\n:HTTP_STATUS/200\n"
        f'data:{{"output":{{"choices":[{{"message":{{"role":"assistant","content":[]}},"finish_reason":"{reason}"}}]}},'
        f'"usage":{{"input_tokens":{usage["input_tokens"]},"output_tokens":{usage["output_tokens"]},'
        f'"audio_tokens":{usage["audio_tokens"]}}},"request_id":"{r.headers["x-request-id"]}"}}'
    )
    before = json.loads(frames[-3].split("\ndata:", 1)[1])  # the text ended in the event before, unfinished
    assert before["output"]["choices"][0]["finish_reason"] == "null"
    assert before["output"]["choices"][0]["message"]["content"][0]["text"]


@pytest.mark.parametrize("stream", [False, True])
def test_max_length_is_max_tokens(server: LiveServer, wav: str, stream: bool) -> None:
    """The Java SDK's maxLength arrives as parameters.max_length; max_tokens wins when both are given."""

    def output_tokens(**params: Any) -> tuple[int, str]:
        r = post(server, request(wav, temperature=0, repetition_penalty=1.0, **params), stream=stream)
        assert r.status_code == 200, r.text
        data = events(r.text)[-1][3] if stream else r.json()
        return data["usage"]["output_tokens"], data["output"]["choices"][0]["finish_reason"]

    assert output_tokens(max_length=3) == (3, "length")
    assert output_tokens(max_length=5, max_tokens=2) == (2, "length")
    bad = post(server, request(wav, max_length=100000))
    assert (bad.status_code, bad.json()["code"]) == (400, "InvalidParameter")


def test_sse_only_with_the_header(server: LiveServer, wav: str) -> None:
    for headers in ({}, {"X-DashScope-SSE": "disable"}, {"Accept": "text/event-stream"}):
        r = post(server, request(wav, max_tokens=4), headers=headers)
        assert r.headers["content-type"] == "application/json" and r.json()["output"]


def test_missing_parameters_and_unknown_keys_are_fine(server: LiveServer, wav: str) -> None:
    body = request(wav)
    body.pop("parameters", None)
    assert post(server, body).status_code == 200
    odd = request(wav, result_format="text", enable_search=True, something_new={"x": 1}, max_tokens=4)
    odd["input"]["prompt"] = "ignored"
    odd["extra_top_level"] = 1
    r = post(server, odd)
    assert r.status_code == 200 and r.json()["output"]["choices"][0]["message"]["content"]  # message form anyway


def test_string_content_for_system_and_assistant(server: LiveServer, wav: str) -> None:
    body = {
        "model": "qwen-audio-chat",
        "input": {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"audio": wav}, {"text": "Hi"}]},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": [{"text": "Again?"}]},
            ]
        },
        "parameters": {"max_tokens": 4},
    }
    assert post(server, body).status_code == 200


@pytest.mark.parametrize(
    ("model", "max_output"),
    [
        ("qwen-audio-turbo", 1500),
        ("qwen-audio-turbo-latest", 2048),
        ("qwen-audio-turbo-2024-12-04", 2048),
        ("qwen-audio-turbo-1204", 2048),
        ("qwen-audio-turbo-2024-08-07", 1500),
        ("qwen-audio-turbo-0807", 1500),
        ("qwen2-audio-instruct", 1500),
        ("qwen-audio-chat", 1500),
    ],
)
def test_every_model_name_with_its_documented_limits(server: LiveServer, model: str, max_output: int) -> None:
    ok = post(server, request(None, "hello", model=model, max_tokens=max_output, stop=["x", "e", "a", " "]))
    assert ok.status_code == 200, ok.text
    over = post(server, request(None, "hello", model=model, max_tokens=max_output + 1))
    assert over.status_code == 400
    assert over.json()["message"] == f"Range of max_tokens should be [1, {max_output}]"


def test_a_prompt_past_the_input_limit(server: LiveServer) -> None:
    long_text = " ".join(f"word{i}" for i in range(4000))  # well over 6000 tokens with the tiny vocabulary
    r = post(server, request(None, long_text, max_tokens=4))
    assert (r.status_code, r.json()["code"], r.json()["message"]) == (
        400,
        "InvalidParameter",
        "Range of input length should be [1, 6000]",
    )


def test_served_model_names_are_added(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with live_server(engine, tmp_path, served_model_name=("my-audio",)) as s:
        assert post(s, request(None, "hi", model="my-audio", max_tokens=2)).status_code == 200
        assert post(s, request(None, "hi", model="qwen-audio-turbo", max_tokens=2)).status_code == 200


# --- errors -----------------------------------------------------------------------------------------------------


def check_error(r: httpx.Response, status: int, code: str, message: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["code", "message", "request_id"]
    assert body["code"] == code and body["request_id"] == r.headers["x-request-id"]
    if message is not None:
        assert body["message"] == message
    return body


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (b"{not json", "BadRequest.IllegalInput", "The input parameter requires json format."),
        (b"[1, 2]", "BadRequest.IllegalInput", "The input parameter requires json format."),
        (b'{"input": {"messages": []}}', "BadRequest.EmptyModel", 'Required parameter "model" missing from request.'),
        (b'{"model": "qwen-audio-turbo"}', "BadRequest.EmptyInput", "Required input parameter missing from request."),
        (
            b'{"model": "qwen-audio-turbo", "input": {"messages": []}}',
            "InvalidParameter",
            "The input messages do not contain elements with the role of user.",
        ),
        (
            b'{"model": "qwen-audio-turbo", "input": {"messages": [{"role": "system", "content": "x"}]}}',
            "InvalidParameter",
            "The input messages do not contain elements with the role of user.",
        ),
        (
            b'{"model": "qwen-audio-turbo", "input": {"messages": [{"role": "robot", "content": "x"}]}}',
            "InvalidParameter",
            None,
        ),
        (
            b'{"model": "qwen-audio-turbo", "input": {"messages": [{"role": "user", "content": "x"}, '
            b'{"role": "system", "content": "late"}]}}',
            "InvalidParameter",
            "The system message must be the first of input.messages.",
        ),
        (
            b'{"model": "qwen-audio-turbo", "input": {"messages": [{"role": "user", "content": [{"image": "x"}]}]}}',
            "InvalidParameter",
            None,
        ),
        (
            b'{"model": "qwen-audio-turbo", "input": {"messages": [{"role": "user", "content": [{"text": 5}]}]}}',
            "InvalidParameter",
            None,
        ),
        (
            b'{"model": "nope", "input": {"messages": [{"role": "user", "content": "x"}]}}',
            "InvalidParameter",
            "Model not exist.",
        ),
    ],
)
def test_malformed_requests(server: LiveServer, body: bytes, code: str, message: str | None) -> None:
    check_error(post(server, body), 400, code, message)
    check_error(post(server, body, stream=True), 400, code, message)  # before the first event: JSON too


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"temperature": 2.0}, "Temperature should be in [0.0, 2.0)"),
        ({"temperature": -0.1}, "Temperature should be in [0.0, 2.0)"),
        ({"top_p": 0}, "Range of top_p should be (0.0, 1.0]"),
        ({"top_p": 1.5}, "Range of top_p should be (0.0, 1.0]"),
        ({"presence_penalty": 2.5}, "Presence_penalty should be in [-2.0, 2.0]"),
        ({"repetition_penalty": 0}, "Repetition_penalty should be greater than 0.0"),
        ({"seed": -1}, "Range of seed should be [0, 2147483647]"),
        ({"max_tokens": 0}, "Range of max_tokens should be [1, 1500]"),
        ({"top_k": -1}, None),
        ({"n": 2}, None),
        ({"tools": [{"type": "function"}]}, None),
        ({"max_tokens": "many"}, None),
        ({"stop": [1, "a"]}, None),
    ],
)
def test_parameter_ranges(server: LiveServer, parameters: dict[str, Any], message: str | None) -> None:
    check_error(post(server, request(None, "hi", **parameters)), 400, "InvalidParameter", message)


def test_every_ingestion_failure_reaches_the_client_as_its_code(
    server: LiveServer, media: MediaHost, corpus, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    short = C.write_wav(tmp_path / "short.wav", C.tone(0.01))
    cases = [
        ("data:;base64,", "InvalidParameter", "The audio is empty"),
        ("", "InvalidParameter", "The audio is empty"),
        (data_uri(short), "InvalidParameter", None),
        (
            "data:;base64," + base64.b64encode(b"<html>hi</html>").decode(),
            "InvalidParameter",
            "The audio format is illegal and cannot be opened.",
        ),
        ("data:;base64,!!!!", "InvalidParameter", None),
        ("data:audio/wav,raw", "InvalidParameter", None),
        (
            "data:;base64," + "A" * (10 * 1024 * 1024 + 4),
            "InvalidParameter",
            "Exceeded limit on max bytes per data-uri item : 10485760",
        ),
        ("http://169.254.169.254/latest/meta-data/", "InvalidURL", None),
        ("http://10.0.0.1/a.wav", "InvalidURL", None),
        ("file:///etc/passwd", "InvalidURL", None),
        ("/etc/passwd", "InvalidURL", None),
        ("oss://dashscope-instant/x/a.wav", "InvalidParameter", None),  # without the resolve header
        (media.url("missing.wav"), "InvalidParameter", "Failed to download multimodal content"),
        (media.url("not-audio.html"), "InvalidParameter", "The audio format is illegal and cannot be opened."),
        ("http://127.0.0.1:9/a.wav", "InvalidURL.ConnectionRefused", None),
    ]
    for audio, code, message in cases:
        body = check_error(post(server, request(audio)), 400, code, message)
        assert "Traceback" not in body["message"]
    nine = {
        "model": "qwen-audio-turbo",
        "input": {
            "messages": [{"role": "user", "content": [{"audio": data_uri(corpus["flac_en"].path)} for _ in range(9)]}]
        },
    }
    check_error(post(server, nine), 400, "InvalidParameter", "Too many audio items: at most 8 per request.")


def test_a_body_over_the_limit_is_refused_before_parsing(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with live_server(engine, tmp_path, max_request_bytes=4096) as s:
        r = post(s, request("data:;base64," + "A" * 8000))
        check_error(r, 400, "BadRequest.TooLarge")


def test_an_unknown_path_is_a_dashscope_404(server: LiveServer) -> None:
    r = httpx.post(server.url + "/api/v1/services/aigc/text-generation/generation", json={})
    assert r.status_code == 404 and r.json()["code"] == "NotFound"


# --- keys, uploads, oss:// ----------------------------------------------------------------------------------


def test_with_api_keys_any_other_key_is_refused(engine, tmp_path: Path, wav: str) -> None:  # type: ignore[no-untyped-def]
    with live_server(engine, tmp_path, api_key=("sk-good", "sk-also-good")) as s:
        for token in (None, "sk-bad", "Bearer"):
            check_error(post(s, request(wav), token=token), 401, "InvalidApiKey", "Invalid API-key provided.")
        assert post(s, request(wav, max_tokens=2), token="sk-good").status_code == 200
        assert post(s, request(wav, max_tokens=2), token="sk-also-good").status_code == 200
        r = httpx.get(s.url + "/api/v1/uploads", params={"action": "getPolicy", "model": "x"})
        check_error(r, 401, "InvalidApiKey")


def get_policy(server: LiveServer, token: str = "sk-test") -> dict[str, Any]:
    r = httpx.get(
        server.url + "/api/v1/uploads",
        params={"action": "getPolicy", "model": "qwen-audio-turbo"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 200
    return r.json()["data"]


def upload(cert: dict[str, Any], name: str, data: bytes, **override: str) -> httpx.Response:
    """The SDK's form upload (contract §4.1 step 2), fields in the SDK's order."""
    fields = {
        "OSSAccessKeyId": cert["oss_access_key_id"],
        "Signature": cert["signature"],
        "policy": cert["policy"],
        "key": f"{cert['upload_dir']}/{name}",
        "x-oss-object-acl": cert["x_oss_object_acl"],
        "x-oss-forbid-overwrite": cert["x_oss_forbid_overwrite"],
        "success_action_status": "200",
    }
    fields.update(override)
    return httpx.post(cert["upload_host"], data=fields, files={"file": (name, data)})


def test_the_upload_flow_binds_files_to_their_key(server: LiveServer, corpus) -> None:  # type: ignore[no-untyped-def]
    policy = get_policy(server, "sk-alice")
    for field in (
        "upload_host",
        "upload_dir",
        "oss_access_key_id",
        "signature",
        "policy",
        "x_oss_object_acl",
        "x_oss_forbid_overwrite",
    ):
        assert isinstance(policy[field], str) and policy[field]
    assert policy["upload_host"] == server.url + "/api/v1/uploads/oss"
    data = corpus["wav_pcm_s16_zh"].path.read_bytes()
    r = upload(policy, "a.wav", data)
    assert (r.status_code, r.content) == (200, b"")
    oss = f"oss://{policy['upload_dir']}/a.wav"
    resolve = {"X-DashScope-OssResourceResolve": "enable"}
    assert post(server, request(oss, max_tokens=2), token="sk-alice", headers=resolve).status_code == 200
    check_error(post(server, request(oss), token="sk-alice"), 400, "InvalidParameter")  # no resolve header
    check_error(post(server, request(oss), token="sk-mallory", headers=resolve), 400, "InvalidParameter")
    again = upload(policy, "a.wav", data)
    assert again.status_code == 409 and again.json()["code"] == "FileAlreadyExists"


def test_uploads_are_checked_against_their_signed_policy(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = get_policy(server)
    forged = base64.b64encode(
        json.dumps({"upload_dir": "x", "exp": 9e12, "owner": "someone-else", "max_bytes": 10**9}).encode()
    ).decode()
    assert upload(policy, "a.wav", b"RIFF", policy=forged).json()["code"] == "SignatureDoesNotMatch"
    assert upload(policy, "a.wav", b"RIFF", Signature="AAAA").status_code == 403
    outside = upload(policy, "a.wav", b"RIFF", key="dashscope-instant/other/a.wav")
    assert outside.status_code == 403 and "starts-with" in outside.json()["message"]
    monkeypatch.setattr(uploads, "POLICY_TTL_S", -1)
    expired = get_policy(server)
    r = upload(expired, "a.wav", b"RIFF")
    assert (r.status_code, r.json()["message"]) == (403, "Invalid according to Policy: Policy expired.")


def test_an_upload_over_the_size_limit(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with live_server(engine, tmp_path, upload_max_bytes=1024 * 1024) as s:
        r = upload(get_policy(s), "big.wav", bytes(1024 * 1024 + 1))
        assert r.status_code == 400 and r.json()["code"] == "EntityTooLarge"
        assert not [p for p in (tmp_path / "uploads").iterdir() if not p.name.startswith(".")]


# --- the stream's life ------------------------------------------------------------------------------------------


def slow_down_steps(engine, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:  # type: ignore[no-untyped-def]
    """Make every decoding step of the engine's real backend take `seconds` longer (until monkeypatch.undo())."""
    real_step = engine.scheduler.backend.step

    def slow_step():  # type: ignore[no-untyped-def]
        time.sleep(seconds)
        return real_step()

    monkeypatch.setattr(engine.scheduler.backend, "step", slow_step)


def test_a_client_that_hangs_up_aborts_the_generation(server: LiveServer, wav: str) -> None:
    engine = server.runtime.engine
    aborted = engine.stats.aborted
    headers = {"Authorization": "Bearer sk-test", "X-DashScope-SSE": "enable"}
    with httpx.stream(
        "POST",
        server.url + "/api/v1/services/aigc/multimodal-generation/generation",
        headers=headers,
        json=request(wav, max_tokens=1500, temperature=0),
        timeout=30,
    ) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data:")
            if seen == 2:
                break
    deadline = time.monotonic() + 10
    while engine.stats.aborted == aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats.aborted == aborted + 1


@pytest.mark.parametrize("path", ["/api/v1/services/aigc/multimodal-generation/generation", "/v1/audio/transcriptions"])
def test_a_client_that_hangs_up_before_a_plain_answer_is_ready_aborts_it_quietly(  # type: ignore[no-untyped-def]
    engine, tmp_path: Path, wav: str, path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    aborted = engine.stats.aborted

    def access() -> list[dict[str, Any]]:
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ting.access"]
        return [line for line in lines if line["path"] == path]

    with live_server(engine, tmp_path) as s, caplog.at_level(logging.INFO):
        slow_down_steps(engine, monkeypatch, 0.1)  # the answer takes long: the client hangs up while it runs
        if path.endswith("/generation"):
            sent = httpx.Request(
                "POST",
                s.url + path,
                json=request(wav, max_tokens=200, temperature=0),
                headers={"Authorization": "Bearer sk-test"},
            )
        else:
            audio = base64.b64decode(wav.split(",", 1)[1])
            sent = httpx.Request(
                "POST",
                s.url + path,
                headers={"Authorization": "Bearer sk-test"},
                files={"file": ("a.wav", audio)},
                data={"model": "qwen-audio-turbo"},
            )
        hang_up_when(sent, lambda: engine.stats.running >= 1, "the request to reach the engine")
        wait_for(lambda: engine.stats.aborted > aborted, "the engine to abort the request")
        wait_for(lambda: bool(access()), "the access-log line")
        monkeypatch.undo()
    assert engine.stats.aborted == aborted + 1
    line = access()[0]
    assert line["status"] == 499 and line["outcome"] == "aborted" and line["code"] == "ClientClosedRequest"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text  # a hang-up is no server error


def test_a_hang_up_during_admission_still_leaves_exactly_one_settled_ledger_row(  # type: ignore[no-untyped-def]
    engine, tmp_path: Path, wav: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with live_server(engine, tmp_path) as s:
        quota = s.runtime.store.quota
        real_admit = quota.admit

        async def slow_admit(*args, **kwargs):  # type: ignore[no-untyped-def]
            await asyncio.sleep(1.0)  # the client gives up meanwhile
            return await real_admit(*args, **kwargs)

        monkeypatch.setattr(quota, "admit", slow_admit)
        audio = base64.b64decode(wav.split(",", 1)[1])
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                s.url + "/v1/audio/transcriptions",
                headers={"Authorization": "Bearer sk-test"},
                timeout=0.3,
                files={"file": ("a.wav", audio)},
                data={"model": "qwen-audio-turbo"},
            )
        deadline = time.monotonic() + 10
        rows: list[Any] = []
        while not rows and time.monotonic() < deadline:
            time.sleep(0.05)
            rows = [r for r in s.run(s.runtime.store.ledger.rows()) if r.status != "pending"]
        assert [(r.status, r.error_code) for r in rows] == [("aborted", "ClientClosedRequest")]
        assert s.run(quota.in_flight()) == 0


def test_keep_alive_comments_during_silence_do_not_disturb_the_events(  # type: ignore[no-untyped-def]
    engine, tmp_path: Path, wav: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with live_server(engine, tmp_path, heartbeat_s=0.02) as s:
        plain = post(s, request(wav, temperature=0, max_tokens=4)).json()
        # Every decoding step takes 0.2 s, ten heartbeat periods: silence no machine is too fast or slow for.
        slow_down_steps(engine, monkeypatch, 0.2)
        r = post(s, request(wav, temperature=0, max_tokens=4, incremental_output=True), stream=True)
        monkeypatch.undo()
    assert r.text.count(":keepalive\n\n") >= 4
    contents = [d["output"]["choices"][0]["message"]["content"] for *_, d in events(r.text)]
    assert (
        contents[-1] == []
        and "".join(c[0]["text"] for c in contents[:-1])
        == plain["output"]["choices"][0]["message"]["content"][0]["text"]
    )


def test_health_and_access_log(server: LiveServer, wav: str, caplog: pytest.LogCaptureFixture) -> None:
    h = httpx.get(server.url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["device"] == "cpu"
    with caplog.at_level(logging.INFO, logger="ting.access"):
        r = post(server, request(wav, max_tokens=3), token="sk-secret-token-123")
        time.sleep(0.2)
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "ting.access"]
    line = next(entry for entry in lines if entry["request_id"] == r.headers["x-request-id"])
    assert line["status"] == 200 and line["model"] == "qwen-audio-turbo" and line["outcome"] == "ok"
    assert line["audio_tokens"] == 127 and line["output_tokens"] == 3 and line["latency_ms"] >= 0
    text = json.dumps(lines)
    assert "sk-secret-token-123" not in text and wav[20:60] not in text
