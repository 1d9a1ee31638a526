"""OpenAI-compatible routes: chat completions with audio, models, Whisper-style transcriptions/translations.

Served under /v1 and under /compatible-mode/v1 (DashScope's compatible mode).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile

from ting.api.auth import bearer
from ting.api.openai.convert import (
    chunk_body,
    completion_body,
    srt,
    to_chat_request,
    transcription_usage,
    usage_chunk_body,
    verbose_body,
    vtt,
)
from ting.api.openai.errors import error_response
from ting.api.openai.schemas import ChatCompletion, ChatCompletionRequest, ErrorResponse, ModelList, Transcription
from ting.api.runtime import runtime_of
from ting.api.streaming import HEARTBEAT, shielded, until_disconnected, with_heartbeats
from ting.api.wire import model_name_problem
from ting.errors import AudioEmpty, AudioTooLarge, InvalidParameter, TingError
from ting.service import Call, Generation, transcription_call

router = APIRouter(tags=["OpenAI"])
PREFIXES = ("/v1", "/compatible-mode/v1")
ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (400, 401, 403, 429, 503)}
FORMATS = ("json", "text", "srt", "verbose_json", "vtt")


async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    chat = to_chat_request(body)
    runtime = runtime_of(request)
    call = Call(chat, "openai", bearer(request), request.state.request_id, log=request.state.access)
    gen = await runtime.service().start(call)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_chunks(gen, body.model, include_usage, runtime.settings.heartbeat_s),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                          "X-Accel-Buffering": "no"})
    try:
        text = await until_disconnected(request, gen.text())
    finally:
        await shielded(gen.close)
    return JSONResponse(completion_body(gen.request_id, body.model, text, gen.finish_reason, gen.usage))


def _data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _chunks(gen: Generation, model: str, include_usage: bool, heartbeat_s: float) -> AsyncIterator[bytes]:
    created = int(time.time())
    rid = gen.request_id
    try:
        yield _data(chunk_body(rid, model, created, {"role": "assistant", "content": ""}, None, include_usage))
        async for item in with_heartbeats(gen, heartbeat_s):
            if item is HEARTBEAT:
                yield b": keep-alive\n\n"
                continue
            chunk = item
            if chunk.text:
                yield _data(chunk_body(rid, model, created, {"content": chunk.text}, None, include_usage))
            if chunk.finish_reason is not None:
                await shielded(gen.close)  # the ledger has it before the client sees the end
                yield _data(chunk_body(rid, model, created, {}, chunk.finish_reason, include_usage))
        if include_usage:
            yield _data(usage_chunk_body(rid, model, created, gen.usage))
        yield b"data: [DONE]\n\n"
    except TingError as exc:
        _, _, body = error_response(exc, rid)
        yield b"data: " + body + b"\n\n"
    finally:
        await shielded(gen.close)


async def models(request: Request) -> ModelList:
    runtime = runtime_of(request)
    await runtime.store.keys.authenticate(bearer(request))
    created = int(runtime.started_at)
    return ModelList(data=[{"id": name, "created": created} for name in runtime.models.names])  # type: ignore[misc]


async def _audio_form(request: Request, task: str) -> Response:
    runtime = runtime_of(request)
    form = await request.form(max_files=1, max_fields=20, max_part_size=64 * 1024)
    file = form.get("file")
    model = str(form.get("model") or "")
    response_format = str(form.get("response_format") or "json")
    if not isinstance(file, UploadFile):
        raise InvalidParameter("file is required: the audio to transcribe, as a multipart file field.")
    if not model:
        raise InvalidParameter("model is required.")
    if problem := model_name_problem(model):
        raise InvalidParameter(problem + ".")
    if response_format not in FORMATS:
        raise InvalidParameter(f"response_format must be one of {', '.join(FORMATS)}.")
    try:
        temperature = float(str(form["temperature"])) if form.get("temperature") not in (None, "") else None
    except ValueError:
        raise InvalidParameter("temperature must be a number.") from None
    limit = runtime.settings.max_transcription_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise AudioTooLarge(f"The file is too large: at most {limit} bytes.")
    if not data:
        raise AudioEmpty()
    language = str(form.get("language") or "") or None
    target = str(form.get("target_language") or "en") if task == "translate" else "en"
    if task == "translate":
        language = None  # the source language is detected; `language` names it in transcriptions only
    call = transcription_call(model, "openai", bearer(request), request.state.request_id, request.state.access)
    transcript = await until_disconnected(request, runtime.transcription().run(
        data, call, task=task, language=language or None, prompt=str(form.get("prompt") or "") or None,
        temperature=temperature, target=target))
    if response_format == "text":
        return PlainTextResponse(transcript.text + "\n")
    if response_format == "srt":
        return PlainTextResponse(srt(transcript.segments), media_type="application/x-subrip")
    if response_format == "vtt":
        return PlainTextResponse(vtt(transcript.segments), media_type="text/vtt")
    if response_format == "verbose_json":
        return JSONResponse(verbose_body(transcript))
    return JSONResponse({"text": transcript.text, "usage": transcription_usage(transcript.usage)})


async def transcriptions(request: Request) -> Response:
    """Whisper's /v1/audio/transcriptions: multipart file, model, language, prompt, response_format, temperature."""
    return await _audio_form(request, "transcribe")


async def translations(request: Request) -> Response:
    """Whisper's /v1/audio/translations: into English (or `target_language`, an extension)."""
    return await _audio_form(request, "translate")


for prefix in PREFIXES:
    router.add_api_route(f"{prefix}/chat/completions", chat_completions, methods=["POST"],
                         response_model=ChatCompletion, responses=ERRORS, summary="Chat completion with audio (OpenAI)")
    router.add_api_route(f"{prefix}/models", models, methods=["GET"], response_model=ModelList,
                         summary="The model names this server answers to")
    router.add_api_route(f"{prefix}/audio/transcriptions", transcriptions, methods=["POST"], responses=ERRORS,
                         response_model=Transcription, summary="Transcribe audio (Whisper API)")
    router.add_api_route(f"{prefix}/audio/translations", translations, methods=["POST"], responses=ERRORS,
                         response_model=Transcription, summary="Translate audio into English (Whisper API)")
