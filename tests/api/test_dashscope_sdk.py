"""The hosted API's documented Python examples, unchanged but for the base URL, against a live server.

Official dashscope SDK (2.0.2, pinned in the dev dependencies); assertions are on the SDK's parsed objects.
"""

from __future__ import annotations

import base64
from pathlib import Path

import dashscope
import pytest
from dashscope import MultiModalConversation

from tests.api.conftest import LiveServer, MediaHost
from ting.audio.decode import decode_bytes
from ting.audio.tokens import billed_audio_tokens

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def point_the_sdk_at_ting(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # The one change a user makes: the base URL (plus some key; the SDK refuses to send none).
    monkeypatch.setattr(dashscope, "base_http_api_url", server.dashscope_base)
    monkeypatch.setattr(dashscope, "api_key", "sk-any-key-works-on-an-open-server")


def billed(path: Path) -> int:
    return billed_audio_tokens(len(decode_bytes(path.read_bytes()).samples))


def answer(response) -> str:  # type: ignore[no-untyped-def]
    assert response.status_code == 200, (response.code, response.message)
    message = response.output.choices[0].message
    assert message.role == "assistant"
    return message.content[0]["text"]


GREEDY = dict(temperature=0, max_tokens=24, seed=1)


def test_quick_start_with_an_audio_url(media: MediaHost, corpus) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "user", "content": [{"audio": media.url("welcome.mp3")}, {"text": "这段音频在说什么?"}]}]
    response = MultiModalConversation.call(model="qwen-audio-turbo-latest", messages=messages, result_format="message")
    text = answer(response)
    assert isinstance(text, str)
    choice = response.output.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert response.request_id and len(response.request_id) == 36
    assert response.usage.audio_tokens == billed(corpus["mp3_cbr_zh"].path)
    assert response.usage.input_tokens > 10 and response.usage.output_tokens >= 1


def test_multi_turn(media: MediaHost) -> None:
    messages = [{"role": "user", "content": [{"audio": media.url("welcome.mp3")}, {"text": "这段音频在说什么?"}]}]
    first = MultiModalConversation.call(model="qwen-audio-turbo", messages=messages, **GREEDY)
    messages.append({"role": "assistant", "content": [{"text": answer(first)}]})
    messages.append({"role": "user", "content": [{"text": "介绍一下这家公司?"}]})
    second = MultiModalConversation.call(model="qwen-audio-turbo", messages=messages, **GREEDY)
    assert answer(second) != "" or second.usage.output_tokens >= 1
    assert second.usage.input_tokens > first.usage.input_tokens  # the history is in the prompt
    assert second.usage.audio_tokens == first.usage.audio_tokens


@pytest.mark.parametrize("incremental", [True, False])
def test_streaming(media: MediaHost, incremental: bool) -> None:
    messages = [{"role": "user", "content": [{"audio": media.url("wav_pcm_s16_en")}, {"text": "What is said?"}]}]
    whole = answer(MultiModalConversation.call(model="qwen-audio-turbo-latest", messages=messages, **GREEDY))
    responses = list(
        MultiModalConversation.call(
            model="qwen-audio-turbo-latest", messages=messages, stream=True, incremental_output=incremental, **GREEDY
        )
    )
    assert len(responses) > 1
    # SDK >= 1.24 turns incremental_output=False into deltas on the wire and adds them up itself.
    if incremental:  # the last event carries no content, as the hosted API's (the examples print only if some)
        assert responses[-1].output.choices[0].message.content == []
        streamed = "".join(answer(r) for r in responses[:-1])
    else:
        streamed = answer(responses[-1])
    assert streamed == whole
    assert [r.output.choices[0].finish_reason for r in responses][-1] in ("stop", "length")
    assert all(r.output.choices[0].finish_reason in ("null", None) for r in responses[:-1])
    assert len({r.request_id for r in responses}) == 1
    assert [r.usage.output_tokens for r in responses] == sorted(r.usage.output_tokens for r in responses)


def test_voice_chat(media: MediaHost) -> None:
    messages = [{"role": "user", "content": [{"audio": media.url("mp3_vbr_id3_en")}]}]
    response = MultiModalConversation.call(model="qwen-audio-turbo-latest", messages=messages, **GREEDY)
    answer(response)
    assert response.usage.audio_tokens > 25


def test_a_local_file_is_uploaded_and_used(corpus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    local = tmp_path / "my recording.wav"
    local.write_bytes(corpus["wav_pcm_s16_zh"].path.read_bytes())
    messages = [{"role": "user", "content": [{"audio": f"file://{local}"}, {"text": "音频里在说什么?"}]}]
    response = MultiModalConversation.call(model="qwen-audio-turbo-latest", messages=messages, **GREEDY)
    answer(response)
    assert response.usage.audio_tokens == billed(local)
    # 2.x SDKs also upload a bare local path
    bare = [{"role": "user", "content": [{"audio": str(local)}, {"text": "再说一遍?"}]}]
    assert answer(MultiModalConversation.call(model="qwen-audio-turbo", messages=bare, **GREEDY)) is not None


def test_base64_audio(corpus) -> None:  # type: ignore[no-untyped-def]
    data = base64.b64encode(corpus["amr_nb_zh"].path.read_bytes()).decode()
    messages = [{"role": "user", "content": [{"audio": f"data:;base64,{data}"}, {"text": "这段音频在说什么?"}]}]
    response = MultiModalConversation.call(model="qwen-audio-turbo-latest", messages=messages, **GREEDY)
    answer(response)
    assert response.usage.audio_tokens == billed(corpus["amr_nb_zh"].path)


def test_several_audios_and_a_system_message(media: MediaHost) -> None:
    messages = [
        {"role": "system", "content": [{"text": "You are a helpful assistant."}]},
        {
            "role": "user",
            "content": [
                {"audio": media.url("flac_en")},
                {"audio": media.url("ogg_opus_zh")},
                {"text": "Which one is in Chinese?"},
            ],
        },
    ]
    response = MultiModalConversation.call(model="qwen2-audio-instruct", messages=messages, **GREEDY)
    answer(response)


def test_errors_come_back_as_sdk_responses(media: MediaHost) -> None:
    bad = MultiModalConversation.call(
        model="qwen-audio-turbo",
        messages=[{"role": "user", "content": [{"audio": media.url("not-audio.html")}, {"text": "?"}]}],
    )
    assert (bad.status_code, bad.code) == (400, "InvalidParameter")
    assert bad.message == "The audio format is illegal and cannot be opened."
    unknown = MultiModalConversation.call(model="qwen-vl-max", messages=[{"role": "user", "content": [{"text": "hi"}]}])
    assert (unknown.status_code, unknown.code, unknown.message) == (400, "InvalidParameter", "Model not exist.")
    too_many = MultiModalConversation.call(
        model="qwen-audio-turbo", max_tokens=1501, messages=[{"role": "user", "content": [{"text": "hi"}]}]
    )
    assert (too_many.status_code, too_many.message) == (400, "Range of max_tokens should be [1, 1500]")
    streamed = list(
        MultiModalConversation.call(
            model="qwen-audio-turbo",
            stream=True,
            incremental_output=True,
            messages=[{"role": "user", "content": [{"audio": "ftp://x/a.mp3"}]}],
        )
    )
    assert (streamed[-1].status_code, streamed[-1].code) == (400, "InvalidURL")
