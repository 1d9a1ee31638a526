"""OpenAI-compatible routes: chat completions with audio, models, Whisper-style transcriptions/translations.

Served under /v1 and under /compatible-mode/v1 (DashScope's compatible mode).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ting.api.auth import bearer
from ting.api.openai.convert import (
    audio_form,
    chunk_body,
    completion_body,
    delta_event,
    done_event,
    json_body,
    served_model,
    srt,
    to_chat_request,
    usage_chunk_body,
    verbose_body,
    vtt,
)
from ting.api.openai.errors import error_body, error_response
from ting.api.openai.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    Model,
    ModelList,
    Transcription,
    TranscriptionForm,
    VerboseTranscription,
)
from ting.api.runtime import runtime_of
from ting.api.streaming import compact_json, event_stream, until_disconnected, with_heartbeats
from ting.errors import AudioEmpty, AudioTooLarge, ModelNotFound, TingError
from ting.service import Call, Transcript, join_windows, transcription_call
from ting.types import FinishReason, GenerationChunk, Usage

router = APIRouter(tags=["OpenAI"])
PREFIXES = ("/v1", "/compatible-mode/v1")
ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 429, 503)}


async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    chat = to_chat_request(body)
    runtime = runtime_of(request)
    call = Call(chat, "openai", bearer(request), request.state.request_id, report=request.state.report)
    gen = await runtime.service().start(call)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = _Frames(gen.request_id, body.model, include_usage, lambda: gen.usage)
        return StreamingResponse(
            event_stream(gen, frames, runtime.settings.heartbeat_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    async with gen:
        text = await until_disconnected(request, gen.text())
    return JSONResponse(completion_body(gen.request_id, body.model, text, gen.finish_reason, gen.usage))


def _data(obj: Any) -> bytes:
    return b"data: " + compact_json(obj) + b"\n\n"


class _Frames:
    """chat.completion.chunk events: the role first, content deltas, the finish, the usage if asked, [DONE]."""

    keepalive = b": keep-alive\n\n"

    def __init__(self, request_id: str, model: str, include_usage: bool, usage: Callable[[], Usage]) -> None:
        self.request_id, self.model, self.include_usage, self.usage = request_id, model, include_usage, usage
        self.created = int(time.time())

    def _chunk(self, delta: dict[str, str], finish_reason: FinishReason | None) -> bytes:
        return _data(chunk_body(self.request_id, self.model, self.created, delta, finish_reason, self.include_usage))

    def opening(self) -> Iterable[bytes]:
        yield self._chunk({"role": "assistant", "content": ""}, None)

    def chunk(self, chunk: GenerationChunk) -> Iterable[bytes]:
        if chunk.text:
            yield self._chunk({"content": chunk.text}, None)
        if chunk.finish_reason is not None:
            yield self._chunk({}, chunk.finish_reason)

    def closing(self) -> Iterable[bytes]:
        if self.include_usage:
            yield _data(usage_chunk_body(self.request_id, self.model, self.created, self.usage()))
        yield b"data: [DONE]\n\n"

    def error(self, exc: TingError) -> bytes:
        return b"data: " + error_response(exc, self.request_id)[2] + b"\n\n"


async def models(request: Request) -> ModelList:
    runtime = runtime_of(request)
    await runtime.store.keys.authenticate(bearer(request))
    created = int(runtime.started_at)
    return ModelList(data=[Model(id=name, created=created) for name in runtime.models.names])


async def model(request: Request, model_id: str) -> Model:
    """One model by name (`client.models.retrieve`); 404 model_not_found for a name this server does not serve."""
    runtime = runtime_of(request)
    await runtime.store.keys.authenticate(bearer(request))
    if model_id not in runtime.models.names:
        raise ModelNotFound(f"The model `{model_id}` does not exist or you do not have access to it.")
    return Model(id=model_id, created=int(runtime.started_at))


async def _audio_form(request: Request, file: UploadFile, form: TranscriptionForm, task: str) -> Response:
    runtime = runtime_of(request)
    args = audio_form(form, task)
    limit = runtime.settings.max_transcription_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise AudioTooLarge(f"The file is too large: at most {limit} bytes.", param="file")
    if not data:
        raise AudioEmpty(param="file")
    call = transcription_call(
        served_model(args.model, runtime.settings.model),
        "openai",
        bearer(request),
        request.state.request_id,
        request.state.report,
    )
    run = functools.partial(
        runtime.transcription().run,
        data,
        call,
        task=task,
        language=args.language,
        prompt=args.prompt,
        temperature=args.temperature,
        target=args.target,
        detect_language=args.response_format == "verbose_json",
    )
    if args.stream:
        return await _transcript_stream(request, run, runtime.settings.heartbeat_s)
    transcript = await until_disconnected(request, run())
    if args.response_format == "text":
        return PlainTextResponse(transcript.text + "\n")
    if args.response_format == "srt":
        return PlainTextResponse(srt(transcript.segments), media_type="application/x-subrip")
    if args.response_format == "vtt":
        return PlainTextResponse(vtt(transcript.segments), media_type="text/vtt")
    if args.response_format == "verbose_json":
        return JSONResponse(verbose_body(transcript))
    return JSONResponse(json_body(transcript, args.model))


async def _transcript_stream(
    request: Request, run: Callable[..., Awaitable[Transcript]], heartbeat_s: float
) -> Response:
    """OpenAI's streaming transcription: a transcript.text.delta per window, in order, then transcript.text.done.

    The request is admitted, decoded and reserved like any other; its errors before the first window is done
    come back with their own status, as a non-streaming request's do.
    """
    done: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    task = asyncio.ensure_future(run(on_text=lambda i, text: done.put_nowait((i, text))))
    deltas = _deltas(done, task)
    try:
        first = await until_disconnected(request, anext(deltas, None))
    except BaseException:
        await _stop(task)
        raise
    return StreamingResponse(
        _transcript_events(first, deltas, task, heartbeat_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _deltas(done: asyncio.Queue[tuple[int, str]], task: asyncio.Future[Transcript]) -> AsyncIterator[str]:
    """The transcript's new text as windows finish, in window order; ends when the transcription does."""
    texts: dict[int, str] = {}
    sent = ""
    while True:
        if done.empty():
            if task.done():
                task.result()  # its error, if it failed
                return
            getter = asyncio.ensure_future(done.get())
            try:
                waiting: list[asyncio.Future[Any]] = [getter, task]
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                got = getter.done()
                if not got:
                    getter.cancel()
            if not got:
                continue  # the transcription ended: what it put in the queue meanwhile is read above
            i, text = getter.result()
        else:
            i, text = done.get_nowait()
        texts[i] = text
        n = 0
        while n in texts:  # the windows done from the first on, without a gap: their text is final
            n += 1
        joined = join_windows([texts[k] for k in range(n)])
        if len(joined) > len(sent):
            yield joined[len(sent) :]
            sent = joined


async def _transcript_events(
    first: str | None, deltas: AsyncIterator[str], task: asyncio.Future[Transcript], heartbeat_s: float
) -> AsyncIterator[bytes]:
    try:
        if first is not None:
            yield _data(delta_event(first))
            async for item in with_heartbeats(deltas, heartbeat_s):
                yield b": keep-alive\n\n" if item is None else _data(delta_event(item))
        yield _data(done_event(task.result()))  # the transcription has settled its ledger row by now
    except TingError as exc:
        yield _data(error_body(exc))
    finally:
        await _stop(task)


async def _stop(task: asyncio.Future[Transcript]) -> None:
    """Cancel a transcription still running (its client went away) and wait until it has settled (not cancellable:
    a stream's own cancellation must not stop it half-way)."""
    if not task.done():
        task.cancel()
    with anyio.CancelScope(shield=True):
        await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: a failure was already answered


# Whisper's form endpoints: (path, task, summary). The form is parsed with the limits below before the route runs.
AUDIO_TASKS = (
    ("transcriptions", "transcribe", "Transcribe audio (Whisper API)"),
    ("translations", "translate", "Translate audio into English, or target_language (Whisper API)"),
)
AUDIO_FORM_LIMITS: Any = {"max_files": 1, "max_fields": 20, "max_part_size": 64 * 1024}


def _audio_route(task: str) -> Callable[..., Awaitable[Response]]:
    async def route(
        request: Request,
        file: Annotated[UploadFile, File(description="The audio: any format Ting decodes")],
        form: Annotated[TranscriptionForm, Form()],
    ) -> Response:
        return await _audio_form(request, file, form, task)

    route.__name__ = task
    return route


for prefix in PREFIXES:
    router.add_api_route(
        f"{prefix}/chat/completions",
        chat_completions,
        methods=["POST"],
        response_model=ChatCompletion,
        responses=ERRORS,
        summary="Chat completion with audio (OpenAI)",
    )
    router.add_api_route(
        f"{prefix}/models",
        models,
        methods=["GET"],
        response_model=ModelList,
        summary="The model names this server answers to",
    )
    router.add_api_route(
        f"{prefix}/models/{{model_id:path}}",
        model,
        methods=["GET"],
        response_model=Model,
        responses=ERRORS,
        summary="One model by name",
    )
    for path, task, summary in AUDIO_TASKS:
        router.add_api_route(
            f"{prefix}/audio/{path}",
            _audio_route(task),
            methods=["POST"],
            responses=ERRORS,
            response_model=Transcription | VerboseTranscription,
            summary=summary,
            form_limits=AUDIO_FORM_LIMITS,
        )
