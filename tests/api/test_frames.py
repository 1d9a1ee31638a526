"""The per-token stream bodies are plain dicts (the hot path); the pydantic schemas (the OpenAPI document and the
non-stream bodies) stay the definition: the two must agree key for key, in order, for every shape a stream takes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ting.api.dashscope.convert import stream_body
from ting.api.dashscope.schemas import OutputMessage, StreamChoice, StreamEvent, StreamOutput, StreamUsage, TextContent
from ting.api.openai.convert import chunk_body
from ting.api.openai.schemas import ChatCompletionChunk, ChunkChoice
from ting.types import Usage

USAGES = [Usage(), Usage(input_tokens=12, audio_tokens=65, output_tokens=3, cached_tokens=70)]


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal, and equal as the bytes a client reads (key order included)."""
    return a == b and json.dumps(a) == json.dumps(b)


@pytest.mark.parametrize("text", [None, "", "你好", 'line\n"quoted"', "x" * 1000])
@pytest.mark.parametrize("finish", [None, "stop", "length"])
@pytest.mark.parametrize("usage", USAGES)
def test_dashscope_stream_body_is_the_schemas_dump(text: str | None, finish: Any, usage: Usage) -> None:
    content = [] if text is None else [TextContent(text=text)]
    expected = StreamEvent(
        output=StreamOutput(
            choices=[StreamChoice(message=OutputMessage(content=content), finish_reason=finish or "null")]
        ),
        usage=StreamUsage(
            input_tokens=usage.input_tokens, output_tokens=usage.output_tokens, audio_tokens=usage.audio_tokens
        ),
        request_id="req-1",
    ).model_dump()
    assert same(stream_body(text, finish, usage, "req-1"), expected)


@pytest.mark.parametrize("delta", [{"role": "assistant", "content": ""}, {"content": "héllo"}, {}])
@pytest.mark.parametrize("finish", [None, "stop", "length"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_openai_chunk_body_is_the_schemas_dump(delta: dict[str, str], finish: Any, include_usage: bool) -> None:
    chunk = ChatCompletionChunk(
        id="chatcmpl-req-1",
        created=1700000000,
        model="qwen2-audio",
        choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish)],
    )
    expected = chunk.model_dump(exclude=None if include_usage else {"usage"})
    assert same(chunk_body("req-1", "qwen2-audio", 1700000000, delta, finish, include_usage), expected)
