"""OpenAI wire JSON <-> domain objects (pure functions)."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ting.api.openai.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    CompletionTokensDetails,
    CompletionUsage,
    ContentPart,
    DurationUsage,
    InputTokenDetails,
    PromptTokensDetails,
    ResponseMessage,
    TokenUsage,
    Transcription,
    TranscriptionForm,
    TranscriptionSegment,
    TranscriptTextDelta,
    TranscriptTextDone,
    VerboseTranscription,
)
from ting.errors import InvalidParameter
from ting.service import Segment, Transcript
from ting.service.language import whisper_name
from ting.types import AudioPart, ChatRequest, FinishReason, Message, Part, SamplingParams, TextPart, Usage

MAX_STOP = 4  # as OpenAI
MAX_STOP_CHARS = 256  # characters per stop sequence
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # OpenAI's seed is an int64
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_FORMAT = re.compile(r"^[a-z0-9.+-]{1,16}$")


def to_chat_request(req: ChatCompletionRequest) -> ChatRequest:
    messages: list[Message] = []
    for i, m in enumerate(req.messages):
        role = ROLES.get(m.role)
        if role is None:
            raise InvalidParameter(
                f"messages[{i}].role {m.role!r} is not supported (system, developer, user, assistant).",
                param=f"messages[{i}].role",
            )
        messages.append(Message(role, _parts(role, m.content, i)))  # type: ignore[arg-type]
    if not any(m.role == "user" for m in messages):
        raise InvalidParameter("messages must contain at least one user message.", param="messages")
    if any(m.role == "system" for m in messages[1:]):
        raise InvalidParameter("A system (or developer) message must come first in messages.", param="messages")
    return ChatRequest(model=req.model, messages=tuple(messages), sampling=sampling(req))


def _parts(role: str, content: str | list[ContentPart] | None, index: int) -> tuple[Part, ...]:
    if content is None:
        if role != "assistant":  # only an assistant turn (one that called tools) may have no content
            raise InvalidParameter(f"messages[{index}].content is required for a {role} message (null was given).")
        return ()
    if isinstance(content, str):
        return (TextPart(content),)
    parts: list[Part] = []
    for j, part in enumerate(content):
        if part.type == "text" and part.text is not None:
            parts.append(TextPart(part.text))
        elif part.type in ("input_audio", "audio_url", "audio"):
            if role != "user":
                raise InvalidParameter(
                    f"messages[{index}]: audio is only accepted in user messages.",
                    param=f"messages[{index}].content[{j}]",
                )
            parts.append(AudioPart(audio_source(part, f"messages[{index}].content[{j}]")))
        else:
            raise InvalidParameter(
                f"messages[{index}].content[{j}]: unsupported content part type "
                f"{part.type!r} (this model takes text, input_audio and audio_url).",
                param=f"messages[{index}].content[{j}].type",
            )
    return tuple(parts)


def audio_source(part: ContentPart, where: str) -> str:
    """What an audio part points at: a URL or data: URI as the audio layer reads it."""
    if part.input_audio is not None:
        data = part.input_audio.data.strip()
        if data.startswith(("http://", "https://", "data:")):
            return data
        fmt = (part.input_audio.format or "").lower()
        mime = f"audio/{fmt}" if _FORMAT.match(fmt) else ""
        return f"data:{mime};base64,{data}"
    url = part.audio_url.url if part.audio_url is not None and not isinstance(part.audio_url, str) else part.audio_url
    if not url:
        raise InvalidParameter(f"{where}: an audio part needs input_audio.data or audio_url.url.", param=where)
    return url


# Each parameter's range: (field, in range, message). The message names the field as `param`.
RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("n", lambda v: v == 1, "n must be 1: this server returns one choice."),
    ("temperature", lambda v: 0 <= v <= 2, "temperature must be between 0 and 2."),
    ("top_p", lambda v: 0 <= v <= 1, "top_p must be between 0 and 1."),
    ("presence_penalty", lambda v: -2 <= v <= 2, "presence_penalty must be between -2 and 2."),
    ("frequency_penalty", lambda v: -2 <= v <= 2, "frequency_penalty must be between -2 and 2."),
    ("repetition_penalty", lambda v: 0 < v < math.inf, "repetition_penalty must be greater than 0."),
    ("seed", lambda v: SEED_MIN <= v <= SEED_MAX, f"seed must be an integer between {SEED_MIN} and {SEED_MAX}."),
    ("top_k", lambda v: v >= 0, "top_k must be 0 (off) or more."),
    ("logprobs", lambda v: not v, "logprobs is not supported."),
    ("tools", lambda v: not v, "tools are not supported by this model."),
    ("modalities", lambda v: set(v) <= {"text"}, 'Only text output is supported (modalities: ["text"]).'),
)


def check_ranges(req: ChatCompletionRequest) -> None:
    for name, in_range, message in RANGES:
        value = getattr(req, name)
        if value is not None and not in_range(value):
            raise InvalidParameter(message, param=name)


def _stop(req: ChatCompletionRequest) -> tuple[str, ...]:
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > MAX_STOP:
        raise InvalidParameter(f"stop takes at most {MAX_STOP} sequences.", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise InvalidParameter(f"Each stop sequence takes at most {MAX_STOP_CHARS} characters.", param="stop")
    return stop


def sampling(req: ChatCompletionRequest) -> SamplingParams:
    check_ranges(req)
    stop = _stop(req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    temperature = req.temperature
    top_p = req.top_p
    if top_p == 0:  # "only the most likely token": greedy
        temperature, top_p = 0.0, None
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=req.top_k,
        seed=req.seed,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        stop=stop,
    )


def usage_body(u: Usage) -> CompletionUsage:
    """prompt_tokens includes the audio tokens, as DashScope's compatible mode and OpenAI count them; cached_tokens
    is the part of them the engine did not prefill again (still billed)."""
    prompt_tokens = u.input_tokens + u.audio_tokens
    return CompletionUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=u.output_tokens,
        total_tokens=u.total_tokens,
        prompt_tokens_details=PromptTokensDetails(
            audio_tokens=u.audio_tokens, text_tokens=u.input_tokens, cached_tokens=min(u.cached_tokens, prompt_tokens)
        ),
        completion_tokens_details=CompletionTokensDetails(text_tokens=u.output_tokens),
    )


def completion_body(
    request_id: str, model: str, text: str, finish: FinishReason | None, usage: Usage
) -> dict[str, Any]:
    return ChatCompletion(
        id=f"chatcmpl-{request_id}",
        created=int(time.time()),
        model=model,
        choices=[Choice(index=0, message=ResponseMessage(content=text), finish_reason=finish or "stop")],
        usage=usage_body(usage),
    ).model_dump()


def chunk_body(
    request_id: str, model: str, created: int, delta: dict[str, str], finish: FinishReason | None, include_usage: bool
) -> dict[str, Any]:
    """One chat.completion.chunk, as a plain dict (once per generated token of every stream: no pydantic model
    on this path). tests/api/test_frames.py checks it equals ChatCompletionChunk's dump."""
    chunk: dict[str, Any] = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    if include_usage:
        chunk["usage"] = None  # present, null until the last event
    return chunk


def usage_chunk_body(request_id: str, model: str, created: int, usage: Usage) -> dict[str, Any]:
    return ChatCompletionChunk(
        id=f"chatcmpl-{request_id}", created=created, model=model, choices=[], usage=usage_body(usage)
    ).model_dump()


# --- transcripts ------------------------------------------------------------------------------------------------


def _clock(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt(segments: tuple[Segment, ...]) -> str:
    cues = [
        f"{i}\n{_clock(s.start_s, ',')} --> {_clock(s.end_s, ',')}\n{s.text}\n"
        for i, s in enumerate((s for s in segments if s.text), start=1)
    ]
    return "\n".join(cues)


def vtt(segments: tuple[Segment, ...]) -> str:
    cues = [f"{_clock(s.start_s, '.')} --> {_clock(s.end_s, '.')}\n{s.text}\n" for s in segments if s.text]
    return "WEBVTT\n\n" + "\n".join(cues)


def verbose_body(t: Transcript) -> dict[str, Any]:
    segments = [
        TranscriptionSegment(
            id=i, seek=int(s.start_s * 100), start=round(s.start_s, 3), end=round(s.end_s, 3), text=s.text
        )
        for i, s in enumerate(t.segments)
    ]
    return VerboseTranscription(
        task=t.task,
        language=whisper_name(t.language),
        duration=t.duration_s,
        text=t.text,
        segments=segments,
        usage=duration_usage(t.duration_s),
    ).model_dump()


def json_body(t: Transcript, model: str) -> dict[str, Any]:
    """`json`: whisper-1 reports the audio's duration as its usage (what it bills), the others tokens."""
    usage = duration_usage(t.duration_s) if model == "whisper-1" else transcription_usage(t.usage)
    return Transcription(text=t.text, usage=usage).model_dump()


def duration_usage(duration_s: float) -> DurationUsage:
    """OpenAI's usage for audio billed by duration: whole seconds, rounded up."""
    return DurationUsage(seconds=math.ceil(duration_s))


def transcription_usage(u: Usage) -> TokenUsage:
    return TokenUsage(
        input_tokens=u.input_tokens + u.audio_tokens,
        input_token_details=InputTokenDetails(audio_tokens=u.audio_tokens, text_tokens=u.input_tokens),
        output_tokens=u.output_tokens,
        total_tokens=u.total_tokens,
    )


def delta_event(delta: str) -> dict[str, Any]:
    return TranscriptTextDelta(delta=delta).model_dump()


def done_event(t: Transcript) -> dict[str, Any]:
    return TranscriptTextDone(text=t.text, usage=transcription_usage(t.usage)).model_dump()


# --- the transcription form ---------------------------------------------------------------------------------------

STREAM_FORMATS = ("json", "text")
# OpenAI's transcription model names: accepted on the transcription endpoints as names of the served model.
TRANSCRIPTION_MODELS = (
    "whisper-1",
    "gpt-transcribe",
    "gpt-4o-transcribe",
    "gpt-4o-mini-transcribe",
    "gpt-4o-mini-transcribe-2025-03-20",
    "gpt-4o-mini-transcribe-2025-12-15",
    "gpt-4o-transcribe-diarize",
)
GRANULARITIES = ("segment", "word")


@dataclass(frozen=True)
class AudioForm:
    """A Whisper-style form, checked (the file itself is read by the route)."""

    model: str  # as named by the client
    response_format: str
    stream: bool
    language: str | None  # transcriptions only: translations detect the source language
    prompt: str | None
    temperature: float | None
    target: str  # translations: the language to translate into (an extension; "en" as Whisper)


def audio_form(form: TranscriptionForm, task: str) -> AudioForm:
    """The form's rules between fields; each field's own rules are TranscriptionForm's."""
    if form.stream and form.response_format not in STREAM_FORMATS:
        raise InvalidParameter(
            f"stream is only available with response_format {' or '.join(STREAM_FORMATS)}.", param="stream"
        )
    _check_granularities(form.timestamp_granularities)
    translating = task == "translate"
    return AudioForm(
        model=form.model,
        response_format=form.response_format,
        stream=form.stream,
        language=None if translating else form.language,
        prompt=form.prompt,
        temperature=form.temperature,
        target=(form.target_language or "en") if translating else "en",
    )


def served_model(name: str, own: str) -> str:
    """The model a transcription request runs on: OpenAI's transcription names mean the checkpoint's own."""
    return own if name in TRANSCRIPTION_MODELS else name


def _check_granularities(values: Sequence[Any]) -> None:
    for value in (str(v) for v in values):
        if value not in GRANULARITIES:
            raise InvalidParameter(
                f"timestamp_granularities takes segment (and word), not {value!r}.", param="timestamp_granularities"
            )
        if value == "word":
            raise InvalidParameter(
                "Word timestamps are not available: Qwen2-Audio does not time its words. Segment timestamps are "
                '(timestamp_granularities=["segment"] with response_format=verbose_json).',
                param="timestamp_granularities",
            )
