"""OpenAI wire JSON <-> domain objects (pure functions)."""

from __future__ import annotations

import re
import time
from typing import Any

from ting.api.openai.schemas import ChatCompletionRequest, ContentPart
from ting.errors import InvalidParameter
from ting.service import Segment, Transcript
from ting.service.transcription import LANGUAGES
from ting.types import AudioPart, ChatRequest, FinishReason, Message, Part, SamplingParams, TextPart, Usage

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_FORMAT = re.compile(r"^[a-z0-9.+-]{1,16}$")


def to_chat_request(req: ChatCompletionRequest) -> ChatRequest:
    messages: list[Message] = []
    for i, m in enumerate(req.messages):
        role = ROLES.get(m.role)
        if role is None:
            raise InvalidParameter(f"messages[{i}].role {m.role!r} is not supported (system, developer, user, "
                                   f"assistant).")
        messages.append(Message(role, _parts(role, m.content, i)))  # type: ignore[arg-type]
    if not any(m.role == "user" for m in messages):
        raise InvalidParameter("messages must contain at least one user message.")
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
                raise InvalidParameter(f"messages[{index}]: audio is only accepted in user messages.")
            parts.append(AudioPart(audio_source(part, f"messages[{index}].content[{j}]")))
        else:
            raise InvalidParameter(f"messages[{index}].content[{j}]: unsupported content part type "
                                   f"{part.type!r} (this model takes text, input_audio and audio_url).")
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
        raise InvalidParameter(f"{where}: an audio part needs input_audio.data or audio_url.url.")
    return url


def sampling(req: ChatCompletionRequest) -> SamplingParams:
    if req.n not in (None, 1):
        raise InvalidParameter("n must be 1: this server returns one choice.")
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise InvalidParameter("temperature must be between 0 and 2.")
    if req.top_p is not None and not 0 <= req.top_p <= 1:
        raise InvalidParameter("top_p must be between 0 and 1.")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None and not -2 <= value <= 2:
            raise InvalidParameter(f"{name} must be between -2 and 2.")
    if req.repetition_penalty is not None and req.repetition_penalty <= 0:
        raise InvalidParameter("repetition_penalty must be greater than 0.")
    if req.top_k is not None and req.top_k < 0:
        raise InvalidParameter("top_k must be 0 (off) or more.")
    if req.logprobs:
        raise InvalidParameter("logprobs is not supported.")
    if req.tools:
        raise InvalidParameter("tools are not supported by this model.")
    if req.modalities and set(req.modalities) - {"text"}:
        raise InvalidParameter("Only text output is supported (modalities: [\"text\"]).")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > 4:
        raise InvalidParameter("stop takes at most 4 sequences.")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    temperature = req.temperature
    top_p = req.top_p
    if top_p == 0:  # "only the most likely token": greedy
        temperature, top_p = 0.0, None
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=req.top_k,
                          seed=req.seed, repetition_penalty=req.repetition_penalty,
                          presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                          stop=stop)


def usage_body(u: Usage) -> dict[str, Any]:
    """prompt_tokens includes the audio tokens, as DashScope's compatible mode and OpenAI count them."""
    return {"prompt_tokens": u.input_tokens + u.audio_tokens, "completion_tokens": u.output_tokens,
            "total_tokens": u.total_tokens,
            "prompt_tokens_details": {"audio_tokens": u.audio_tokens, "text_tokens": u.input_tokens},
            "completion_tokens_details": {"text_tokens": u.output_tokens}}


def completion_body(request_id: str, model: str, text: str, finish: FinishReason | None,
                    usage: Usage) -> dict[str, Any]:
    return {"id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish or "stop", "logprobs": None}],
            "usage": usage_body(usage)}


def chunk_body(request_id: str, model: str, created: int, delta: dict[str, Any], finish: FinishReason | None,
               include_usage: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": created,
                            "model": model, "system_fingerprint": None,
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk_body(request_id: str, model: str, created: int, usage: Usage) -> dict[str, Any]:
    return {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": [], "usage": usage_body(usage)}


# --- transcripts ------------------------------------------------------------------------------------------------


def _clock(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt(segments: tuple[Segment, ...]) -> str:
    cues = [f"{i}\n{_clock(s.start_s, ',')} --> {_clock(s.end_s, ',')}\n{s.text}\n"
            for i, s in enumerate((s for s in segments if s.text), start=1)]
    return "\n".join(cues)


def vtt(segments: tuple[Segment, ...]) -> str:
    cues = [f"{_clock(s.start_s, '.')} --> {_clock(s.end_s, '.')}\n{s.text}\n" for s in segments if s.text]
    return "WEBVTT\n\n" + "\n".join(cues)


def verbose_body(t: Transcript) -> dict[str, Any]:
    language = LANGUAGES.get(t.language or "", t.language or "unknown").lower()
    segments = [{"id": i, "seek": int(s.start_s * 100), "start": round(s.start_s, 3), "end": round(s.end_s, 3),
                 "text": s.text, "tokens": [], "temperature": 0.0, "avg_logprob": 0.0, "compression_ratio": 0.0,
                 "no_speech_prob": 0.0} for i, s in enumerate(t.segments)]
    return {"task": t.task, "language": language, "duration": t.duration_s, "text": t.text, "segments": segments,
            "usage": transcription_usage(t.usage)}


def transcription_usage(u: Usage) -> dict[str, Any]:
    return {"type": "tokens", "input_tokens": u.input_tokens + u.audio_tokens,
            "input_token_details": {"audio_tokens": u.audio_tokens, "text_tokens": u.input_tokens},
            "output_tokens": u.output_tokens, "total_tokens": u.total_tokens}
