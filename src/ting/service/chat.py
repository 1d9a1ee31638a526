"""The one use case both wire protocols share: answer a chat request about audio.

Everything that can fail happens in `ChatService.start`, before the first byte goes out: authentication,
admission (rate and concurrency limits), the model name, parameter limits, fetching and decoding every
audio item, the prompt, the quota reservation, and the engine's first token. What it returns streams the
rest and settles the request exactly once (service/lifecycle.py), whether it finished, failed or its client
went away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import anyio

from ting.audio import AudioLoader, billed_audio_tokens
from ting.engine import EngineClient
from ting.errors import EngineError, InputTooLong, InvalidParameter, ModelNotFound, TingError
from ting.service.lifecycle import Call, Lifecycle, Ticket
from ting.store import Principal
from ting.types import AudioClip, AudioPart, ChatRequest, FinishReason, GenerationChunk, Message, SamplingParams, Usage

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


class Generation:
    """A started request: iterate for its chunks (usage with billed audio tokens).

    The chunk that ends the answer comes out only once the request is settled, so the ledger has it before the
    client sees the end. `async with generation:` settles it on every other way out: an error, a client gone, a
    stream closed early (the engine request is aborted then).
    """

    def __init__(
        self, ticket: Ticket, stream: AsyncGenerator[GenerationChunk], first: GenerationChunk, billed_audio_tokens: int
    ) -> None:
        self.ticket = ticket
        self.request_id = ticket.request_id
        self._stream = stream
        self._billed = billed_audio_tokens
        self.usage = Usage()
        self.finish_reason: FinishReason | None = None
        self._first: GenerationChunk | None = self._take(first)
        ticket.first_token_at = ticket.last_token_at = time.monotonic()
        ticket.first_token_ms = int((ticket.first_token_at - ticket.started) * 1000)

    def _take(self, raw: GenerationChunk) -> GenerationChunk:
        chunk = replace(raw, usage=replace(raw.usage, audio_tokens=self._billed))
        self.usage = self.ticket.usage = chunk.usage
        if raw.token_ids:
            self.ticket.last_token_at = time.monotonic()
        self.finish_reason = chunk.finish_reason
        return chunk

    async def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        try:
            chunk, self._first = self._first, None
            while chunk is not None:
                if chunk.finish_reason is not None:
                    await self.ticket.settle()  # before the client sees the end
                    yield chunk
                    return
                yield chunk
                chunk = self._take(await anext(self._stream))
        except TingError as exc:
            await self.close(exc)
            raise
        except Exception as exc:
            log.exception("generation %s failed", self.request_id)
            await self.close(exc)
            raise EngineError() from exc

    async def text(self) -> str:
        """Run to the end; the whole answer."""
        return "".join([chunk.text async for chunk in self])

    async def close(self, exc: BaseException | None = None) -> None:
        """Stop generating if still running, and settle exactly once (not cancellable)."""
        if self.ticket.settled:
            return
        if exc is None and self.finish_reason is None:
            exc = asyncio.CancelledError()  # closed before its end: the client went away
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()  # aborts the engine request if it is still running
            await self.ticket.settle(exc)

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close(exc)


class ChatService:
    def __init__(
        self,
        lifecycle: Lifecycle,
        engine: EngineClient,
        audio: AudioLoader,
        models: Models,
        *,
        max_audio_items: int = 8,
    ) -> None:
        self.lifecycle, self.engine, self.audio, self.models = lifecycle, engine, audio, models
        self.max_audio_items = max_audio_items

    async def start(self, call: Call) -> Generation:
        """Everything that can fail before the first token; the Generation streams the rest."""
        ticket = await self.lifecycle.admit(call)
        try:
            request = call.request
            limits = self.models.get(request.model)
            params = self._check_params(request.sampling, limits)
            refuse_what_cannot_fit(request, limits)
            clips = await self._load_audio(call, ticket.who)
            ticket.audio_seconds = sum(c.seconds for c in clips)
            prompt = await self.engine.prepare(_with_clips(request.messages, clips))
            if len(prompt.token_ids) > limits.max_input_tokens:
                raise InputTooLong(f"Range of input length should be [1, {limits.max_input_tokens}]")
            sampling = self.engine.resolve(params, prompt)
            billed = sum(billed_audio_tokens(len(c.samples)) for c in clips)
            await ticket.reserve(prompt.text_tokens + billed + sampling.max_tokens)
            stream = self.engine.generate(prompt, sampling, request_id=call.request_id, cache_salt=ticket.cache_salt)
            try:
                first = await anext(stream)
            except BaseException:
                await stream.aclose()
                raise
        except BaseException as exc:
            await ticket.settle(exc)
            raise
        return Generation(ticket, stream, first, billed)

    def _check_params(self, params: SamplingParams, limits: ModelLimits) -> SamplingParams:
        if params.max_tokens is None:
            return replace(params, max_tokens=limits.max_output_tokens)
        if not 1 <= params.max_tokens <= limits.max_output_tokens:
            raise InvalidParameter(f"Range of max_tokens should be [1, {limits.max_output_tokens}]", param="max_tokens")
        return params

    async def _load_audio(self, call: Call, who: Principal) -> list[AudioClip]:
        parts = call.request.audio_parts
        if len(parts) > self.max_audio_items:
            raise InvalidParameter(f"Too many audio items: at most {self.max_audio_items} per request.")
        try:
            async with asyncio.TaskGroup() as group:  # one failure cancels the other downloads
                tasks = [
                    group.create_task(self.audio.load(p.source, owner=who.owner, oss_resolve=call.oss_resolve))
                    for p in parts
                ]
        except BaseExceptionGroup as failed:
            raise first_error(failed) from None
        return [t.result() for t in tasks]


# A cheap estimate, before any audio is fetched or any text tokenized, of whether a prompt can fit: every message
# costs at least 4 template tokens (role header, end marker), and a text of more than 16 characters per allowed token
# (98,304 characters for 6,144 tokens; English runs at about 4 per token, Chinese under 2) cannot fit either.
MIN_TOKENS_PER_MESSAGE = 4
MAX_CHARS_PER_TOKEN = 16


def refuse_what_cannot_fit(request: ChatRequest, limits: ModelLimits) -> None:
    if (
        request.text_chars > MAX_CHARS_PER_TOKEN * limits.max_input_tokens
        or MIN_TOKENS_PER_MESSAGE * len(request.messages) > limits.max_input_tokens
    ):
        raise InputTooLong(f"Range of input length should be [1, {limits.max_input_tokens}]")


def first_error(group: BaseExceptionGroup) -> BaseException:
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


__all__ = ["Call", "ChatService", "Generation", "ModelLimits", "Models", "first_error"]
