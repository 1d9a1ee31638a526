"""The one use case both wire protocols share: answer a chat request about audio.

Everything that can fail happens in `ChatService.start`, before the first byte goes out: authentication,
admission (rate and concurrency limits), the model name, parameter limits, fetching and decoding every
audio item, the prompt, the quota reservation, and the engine's first token. What it returns streams the
rest; its `close()` settles the request exactly once, whether it finished, failed or its client went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ting.audio import AudioLoader, billed_audio_tokens
from ting.config import Settings
from ting.engine import Engine, Prompt
from ting.errors import EngineError, InputTooLong, InvalidParameter, ModelNotFound, TingError
from ting.store import Outcome, Principal, Store
from ting.types import AudioClip, AudioPart, ChatRequest, GenerationChunk, Message, SamplingParams, TextPart, Usage

log = logging.getLogger("ting.service")


@dataclass(frozen=True)
class ModelLimits:
    context_tokens: int
    max_input_tokens: int
    max_output_tokens: int


# The hosted API's model names, all served by the loaded checkpoint, with its documented limits.
QWEN_AUDIO = ModelLimits(8000, 6000, 1500)
QWEN_AUDIO_LATEST = ModelLimits(8192, 6144, 2048)
DASHSCOPE_MODELS = {
    "qwen-audio-turbo": QWEN_AUDIO,
    "qwen-audio-turbo-latest": QWEN_AUDIO_LATEST,
    "qwen-audio-turbo-2024-12-04": QWEN_AUDIO_LATEST,
    "qwen-audio-turbo-1204": QWEN_AUDIO_LATEST,
    "qwen-audio-turbo-2024-08-07": QWEN_AUDIO,
    "qwen-audio-turbo-0807": QWEN_AUDIO,
    "qwen2-audio-instruct": QWEN_AUDIO,
    "qwen-audio-chat": QWEN_AUDIO,
}


class Models:
    """The model names this server answers to."""

    def __init__(self, checkpoint: str, extra: Sequence[str] = (), max_model_len: int = 8192) -> None:
        own = ModelLimits(max_model_len, max_model_len - 2048, 2048)
        self.limits: dict[str, ModelLimits] = dict(DASHSCOPE_MODELS)
        for name in (checkpoint, *extra):
            self.limits.setdefault(name, own)

    @property
    def names(self) -> list[str]:
        return list(self.limits)

    def get(self, name: str) -> ModelLimits:
        if name not in self.limits:
            raise ModelNotFound()
        return self.limits[name]


@dataclass(frozen=True)
class Call:
    """One request, as a protocol hands it over."""

    request: ChatRequest
    protocol: str  # "dashscope" | "openai"
    token: str | None  # the bearer token
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    oss_resolve: bool = True  # DashScope: the X-DashScope-OssResourceResolve header was sent
    max_audio_seconds: float | None = None  # None: the model's 30 s window
    log: dict[str, Any] = field(default_factory=dict)  # filled in for the access log (nothing secret)


def new_request_id() -> str:
    return str(uuid.uuid4())


class Generation:
    """A started request: iterate for chunks (usage with billed audio tokens); close() settles it."""

    def __init__(self, service: ChatService, call: Call, who: Principal, clips: list[AudioClip], prompt: Prompt,
                 stream: AsyncIterator[GenerationChunk], first: GenerationChunk, started: float) -> None:
        self.service, self.call, self.who, self.clips, self.prompt = service, call, who, clips, prompt
        self.request_id = call.request_id
        self.billed_audio_tokens = sum(billed_audio_tokens(len(c.samples)) for c in clips)
        self.audio_seconds = sum(c.seconds for c in clips)
        self.truncated = any(c.truncated for c in clips)
        self._stream = stream
        self._pending: GenerationChunk | None = self._bill(first)
        self.started = started
        self.first_token_ms = int((time.monotonic() - started) * 1000)
        self.usage = self._pending.usage
        self.finish_reason = self._pending.finish_reason
        self.error: TingError | None = None
        self._settled = False

    def _bill(self, chunk: GenerationChunk) -> GenerationChunk:
        return replace(chunk, usage=replace(chunk.usage, audio_tokens=self.billed_audio_tokens))

    async def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        try:
            if self._pending is not None:
                chunk, self._pending = self._pending, None
                yield chunk
                if chunk.finish_reason is not None:
                    return
            async for raw in self._stream:
                chunk = self._bill(raw)
                self.usage, self.finish_reason = chunk.usage, chunk.finish_reason
                yield chunk
        except TingError as exc:
            self.error = exc
            raise
        except Exception as exc:
            log.exception("generation %s failed", self.request_id)
            self.error = EngineError()
            raise self.error from exc

    async def text(self) -> str:
        """Run to the end; the whole answer."""
        return "".join([chunk.text async for chunk in self])

    async def close(self) -> None:
        """Stop generating if still running, and settle exactly once (not cancellable)."""
        if self._settled:
            return
        self._settled = True
        await self._stream.aclose()  # aborts the engine request if it is still running
        if self.error is not None:
            status, code = "error", self.error.code
        elif self.finish_reason is None:
            status, code = "aborted", "ClientClosedRequest"
        else:
            status, code = "ok", None
        outcome = Outcome(status, self.usage, self.audio_seconds, code,
                          int((time.monotonic() - self.started) * 1000))
        await self.service.settle(self.call, self.who, outcome, first_token_ms=self.first_token_ms)


class ChatService:
    def __init__(self, settings: Settings, engine: Engine, audio: AudioLoader, store: Store, models: Models) -> None:
        self.settings, self.engine, self.audio, self.store, self.models = settings, engine, audio, store, models
        self._settling: set[asyncio.Task[None]] = set()

    async def admit(self, call: Call, **log: Any) -> Principal:
        """Authenticate the caller and open the request's ledger row (or refuse it, with a row of its own).

        A caller cancelled meanwhile (a client hanging up: Task.cancel() from the API layer) does not leave an
        admitted, unsettled row behind for the next restart: the admission runs to its end, then the abort is
        settled and the cancellation goes on.
        """
        started = time.monotonic()
        admitting = asyncio.ensure_future(self._admit(call, log))
        try:
            return await asyncio.shield(admitting)
        except asyncio.CancelledError:
            try:
                who = await admitting
            except Exception:
                raise asyncio.CancelledError() from None  # refused: its row is written, nothing to settle
            await self.settle(call, who, Outcome("aborted", error_code="ClientClosedRequest",
                                                 latency_ms=int((time.monotonic() - started) * 1000)))
            raise

    async def _admit(self, call: Call, log: dict[str, Any]) -> Principal:
        who = await self.store.keys.authenticate(call.token)
        call.log.update(protocol=call.protocol, model=call.request.model, key=who.key_id or who.name, **log)
        try:
            await self.store.quota.admit(who, call.request_id, model=call.request.model, protocol=call.protocol)
        except TingError as exc:
            call.log.update(outcome="refused", code=exc.code)
            raise
        return who

    async def start(self, call: Call) -> Generation:
        started = time.monotonic()
        who = await self.admit(call)
        request = call.request
        try:
            limits = self.models.get(request.model)
            params = self._check_params(request.sampling, limits)
            clips = await self._load_audio(call, who)
            messages = _with_clips(request.messages, clips)
            prompt = await self.engine.prepare(messages)
            if len(prompt.token_ids) > limits.max_input_tokens:
                raise InputTooLong(f"Range of input length should be [1, {limits.max_input_tokens}]")
            sampling = self.engine.resolve(params, prompt)
            most = prompt.text_tokens + sum(billed_audio_tokens(len(c.samples)) for c in clips) + sampling.max_tokens
            await self.store.quota.reserve(who, call.request_id, most)
            stream = aiter(self.engine.generate(prompt, sampling, request_id=call.request_id))
            try:
                first = await anext(stream)
            except BaseException:
                await stream.aclose()
                raise
        except TingError as exc:
            await self.settle(call, who, Outcome("error" if exc.status != 429 else "refused", error_code=exc.code,
                                                 latency_ms=int((time.monotonic() - started) * 1000)))
            raise
        except BaseException:
            await self.settle(call, who, Outcome("aborted", error_code="ClientClosedRequest",
                                                 latency_ms=int((time.monotonic() - started) * 1000)))
            raise
        return Generation(self, call, who, clips, prompt, stream, first, started)

    def _check_params(self, params: SamplingParams, limits: ModelLimits) -> SamplingParams:
        if params.max_tokens is None:
            return replace(params, max_tokens=limits.max_output_tokens)
        if not 1 <= params.max_tokens <= limits.max_output_tokens:
            raise InvalidParameter(f"Range of max_tokens should be [1, {limits.max_output_tokens}]", param="max_tokens")
        return params

    async def _load_audio(self, call: Call, who: Principal) -> list[AudioClip]:
        parts = call.request.audio_parts
        if len(parts) > self.settings.max_audio_items:
            raise InvalidParameter(f"Too many audio items: at most {self.settings.max_audio_items} per request.")
        window = call.max_audio_seconds or 30.0
        try:
            async with asyncio.TaskGroup() as group:  # one failure cancels the other downloads
                tasks = [group.create_task(self.audio.load(p.source, owner=who.owner, oss_resolve=call.oss_resolve,
                                                           max_seconds=window)) for p in parts]
        except BaseExceptionGroup as failed:
            raise _first_error(failed) from None
        return [t.result() for t in tasks]

    async def settle(self, call: Call, who: Principal, outcome: Outcome, *, first_token_ms: int | None = None) -> None:
        """Record the request in the ledger and the access log, in a task the caller's cancellation cannot stop."""
        task = asyncio.ensure_future(self._settle(call, who, outcome, first_token_ms))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)

    async def _settle(self, call: Call, who: Principal, outcome: Outcome, first_token_ms: int | None) -> None:
        u = outcome.usage
        call.log.update(outcome=outcome.status, code=outcome.error_code, audio_s=round(outcome.audio_seconds, 3),
                        audio_tokens=u.audio_tokens, input_tokens=u.input_tokens, output_tokens=u.output_tokens,
                        first_token_ms=first_token_ms)
        try:
            await self.store.quota.settle(call.request_id, outcome)
        except Exception:
            log.exception("settling %s failed; it stays reserved until the next restart", call.request_id)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for settlements in flight (at shutdown)."""
        if self._settling:
            await asyncio.wait(list(self._settling), timeout=timeout_s)


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to report from a group: the first TingError, else the first error."""
    flat: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            stack[:0] = list(exc.exceptions)
        else:
            flat.append(exc)
    return next((e for e in flat if isinstance(e, TingError)), flat[0])


def _with_clips(messages: Sequence[Message], clips: list[AudioClip]) -> tuple[Message, ...]:
    it = iter(clips)
    out = []
    for m in messages:
        parts: list[Any] = [AudioPart(p.source, next(it)) if isinstance(p, AudioPart) else p for p in m.parts]
        out.append(Message(m.role, tuple(parts)))
    return tuple(out)


__all__ = ["Call", "ChatService", "Generation", "ModelLimits", "Models", "TextPart", "Usage", "new_request_id"]
