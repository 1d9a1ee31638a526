"""DashScope wire JSON <-> domain objects. Pure functions; the error texts are DashScope's."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ting.api.dashscope.schemas import (
    Choice,
    GenerationParameters,
    GenerationRequest,
    GenerationResponse,
    GenerationUsage,
    Output,
    OutputMessage,
    TextContent,
)
from ting.errors import InvalidParameter
from ting.types import AudioPart, ChatRequest, FinishReason, Message, Part, SamplingParams, TextPart, Usage

ROLES = ("system", "user", "assistant")
SEED_MAX = 2**31 - 1
MAX_STOP = 16  # stop strings or token ids per request (OpenAI takes 4; no DashScope client needs more)
MAX_STOP_CHARS = 256  # characters per stop string
TOKEN_ID_MAX = 2**31 - 1


def to_chat_request(req: GenerationRequest) -> tuple[ChatRequest, bool]:
    """The domain request, and whether the stream should carry deltas (incremental_output)."""
    assert req.model is not None and req.input is not None
    messages = req.input.messages or []
    if not messages:
        raise InvalidParameter("The input messages do not contain elements with the role of user.")
    domain: list[Message] = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidParameter(f"input.messages.{i}.role must be one of system, user or assistant, not {m.role!r}.")
        domain.append(Message(m.role, _parts(m.role, m.content, i)))  # type: ignore[arg-type]
    if not any(m.role == "user" for m in domain):
        raise InvalidParameter("The input messages do not contain elements with the role of user.")
    if any(m.role == "system" for m in domain[1:]):
        raise InvalidParameter("The system message must be the first of input.messages.")
    params = req.parameters or GenerationParameters()
    chat = ChatRequest(model=req.model, messages=tuple(domain), sampling=sampling(params))
    return chat, bool(params.incremental_output)


def _parts(role: str, content: Any, index: int) -> tuple[Part, ...]:
    if isinstance(content, str):
        return (TextPart(content),)
    parts: list[Part] = []
    for j, item in enumerate(content):
        extra = set(item.model_extra or {})
        if item.audio is not None:
            if role != "user":
                raise InvalidParameter(f"input.messages.{index}: audio is only accepted in user messages.")
            parts.append(AudioPart(item.audio))
        elif item.text is not None:
            parts.append(TextPart(item.text))
        elif extra & {"image", "video"}:
            raise InvalidParameter(
                f"input.messages.{index}.content.{j}: this model takes audio and text, "
                f"not {sorted(extra & {'image', 'video'})[0]}."
            )
        else:
            raise InvalidParameter(f"input.messages.{index}.content.{j} needs a text or an audio field.")
    return tuple(parts)


# Each parameter's range, in the hosted API's own words: (field, in range, message).
RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("temperature", lambda v: 0.0 <= v < 2.0, "Temperature should be in [0.0, 2.0)"),
    ("top_p", lambda v: 0.0 < v <= 1.0, "Range of top_p should be (0.0, 1.0]"),
    ("top_k", lambda v: v >= 0, "Range of top_k should be [0, 100] (0 or above 100 disables it)"),
    ("seed", lambda v: 0 <= v <= SEED_MAX, f"Range of seed should be [0, {SEED_MAX}]"),
    ("repetition_penalty", lambda v: 0 < v < math.inf, "Repetition_penalty should be greater than 0.0"),
    ("presence_penalty", lambda v: -2.0 <= v <= 2.0, "Presence_penalty should be in [-2.0, 2.0]"),
    ("n", lambda v: v == 1, "Range of n should be [1, 1] for this model."),
)


def check_ranges(p: GenerationParameters) -> None:
    for name, in_range, message in RANGES:
        value = getattr(p, name)
        if value is not None and not in_range(value):
            raise InvalidParameter(message)
    if p.tools:
        raise InvalidParameter("The model does not support tools.")


def sampling(p: GenerationParameters) -> SamplingParams:
    check_ranges(p)
    stop, stop_ids = _stop(p.stop)
    top_k = p.top_k if p.top_k is not None and p.top_k <= 100 else 0
    return SamplingParams(
        max_tokens=max_tokens(p),
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=top_k if p.top_k is not None else None,
        seed=p.seed,
        repetition_penalty=p.repetition_penalty,
        presence_penalty=p.presence_penalty or 0.0,
        stop=stop,
        stop_token_ids=stop_ids,
    )


def _stop(stop: str | list[str] | list[int] | None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Stop strings, or stop token ids (the two cannot be mixed), within their bounds."""
    items = [stop] if isinstance(stop, str) else list(stop or [])
    if len(items) > MAX_STOP:
        raise InvalidParameter(f"Range of stop length should be [0, {MAX_STOP}]")
    if all(isinstance(s, str) for s in items):
        if any(len(s) > MAX_STOP_CHARS for s in items):  # type: ignore[arg-type]
            raise InvalidParameter(f"Range of each stop string's length should be [0, {MAX_STOP_CHARS}]")
        return tuple(items), ()  # type: ignore[arg-type]
    if any(not 0 <= s <= TOKEN_ID_MAX for s in items):  # type: ignore[operator]
        raise InvalidParameter(f"Range of stop token ids should be [0, {TOKEN_ID_MAX}]")
    return (), tuple(items)  # type: ignore[arg-type]


def max_tokens(p: GenerationParameters) -> int | None:
    """`max_tokens`, or the Java SDK's `max_length` (its `maxLength`) when only that is given; max_tokens wins."""
    return p.max_tokens if p.max_tokens is not None else p.max_length


def response_body(text: str, finish_reason: FinishReason | None, usage: Usage, request_id: str) -> dict[str, Any]:
    """The non-stream body, key order as the hosted API's own example (contract §2.5)."""
    return GenerationResponse(
        output=Output(
            choices=[
                Choice(finish_reason=finish_reason or "stop", message=OutputMessage(content=[TextContent(text=text)]))
            ]
        ),
        usage=GenerationUsage(
            audio_tokens=usage.audio_tokens, output_tokens=usage.output_tokens, input_tokens=usage.input_tokens
        ),
        request_id=request_id,
    ).model_dump()


def stream_body(text: str | None, finish_reason: FinishReason | None, usage: Usage, request_id: str) -> dict[str, Any]:
    """One stream event's data, key order as the contract's capture (§2.6). No text (None): `"content": []`, as the
    hosted API's last event of an incremental stream carries.

    Built as a plain dict, once per generated token of every stream: validating a pydantic StreamEvent and dumping
    it was a fifth of the server's streaming time. tests/api/test_frames.py checks it equals StreamEvent's dump."""
    return {
        "output": {
            "choices": [
                {
                    "message": {"role": "assistant", "content": [] if text is None else [{"text": text}]},
                    "finish_reason": finish_reason or "null",
                }
            ]
        },
        "usage": {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "audio_tokens": usage.audio_tokens,
        },
        "request_id": request_id,
    }


def stream_frames(
    delta: str, whole: str, finish_reason: FinishReason | None, usage: Usage, request_id: str, incremental: bool
) -> list[dict[str, Any]]:
    """The events one generated chunk makes. Incremental: its delta, and at the end a last event with
    `"content": []` and the finish reason (as the hosted API ends such a stream). Otherwise one event with the
    whole text so far, the last one carrying the finish reason."""
    if not incremental:
        return [stream_body(whole, finish_reason, usage, request_id)]
    frames = [stream_body(delta, None, usage, request_id)] if delta else []
    if finish_reason is not None:
        frames.append(stream_body(None, finish_reason, usage, request_id))
    return frames


def error_body(code: str, message: str, request_id: str) -> dict[str, str]:
    return {"code": code, "message": message, "request_id": request_id}
