"""The model: a Prompt and sampling parameters in, a stream of GenerationChunk out.

Two engines offer the same `EngineClient` interface to the service layer:

* `RemoteEngine` (ting.engine.process, what `ting serve` runs): the model and the scheduler in a process of
  their own (ting.engine.core), restarted if it dies or hangs; the server process keeps the prompt preparation;
* `Engine`: a Backend (the model, on the engine's own thread) and a Scheduler (continuous batching) inside the
  calling process (tests, benchmarks, `--no-engine-process`).

Only `ting.engine.qwen2_audio` and `ting.engine.tiny` import torch; they are loaded on first use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import math
import os
import secrets
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from ting.engine.backend import Backend, Defaults, Prompt, Sampling
from ting.engine.scheduler import Scheduler, Stats
from ting.errors import InputTooLong, InvalidParameter
from ting.types import GenerationChunk, Message, SamplingParams

__all__ = ["Engine", "EngineClient", "Prompt", "Sampling", "Stats", "resolve_sampling"]

# Tokenizing and feature extraction run on threads of their own: never on the event loop's default executor, where
# they would queue in front of (and behind) audio decoding and file reads.
PREPARE_THREADS = max(2, min(8, (os.cpu_count() or 2) // 2))
_prepare_threads: ThreadPoolExecutor | None = None


async def on_prepare_threads(prepare: Callable[[Sequence[Message]], Prompt], messages: Sequence[Message]) -> Prompt:
    """Run a backend's prepare on the process's prepare threads (made on first use)."""
    global _prepare_threads
    if _prepare_threads is None:
        _prepare_threads = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="ting-prepare")
    return await asyncio.get_running_loop().run_in_executor(_prepare_threads, prepare, messages)


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what a torch generator takes (a negative seed is taken modulo 2^64)


class EngineClient(Protocol):
    """What the service layer uses of an engine, in-process or in its own process."""

    @property
    def alive(self) -> bool: ...

    @property
    def stats(self) -> Stats: ...

    def describe(self) -> dict[str, Any]: ...

    async def prepare(self, messages: Sequence[Message]) -> Prompt: ...

    def resolve(self, params: SamplingParams, prompt: Prompt) -> Sampling: ...

    def generate(
        self, prompt: Prompt, sampling: Sampling, *, request_id: str = "", cache_salt: str = ""
    ) -> AsyncGenerator[GenerationChunk]:
        """Stream the answer. Keys and values cached from earlier requests are reused only between requests of
        equal `cache_salt` (who is asking: one tenant never times another's prompts)."""
        ...


TEST_WRAPPER_ENV = "TING_TEST_BACKEND_WRAPPER"  # tests and benches only: "module:function" applied to the backend


def apply_test_wrapper(backend: Backend) -> Backend:
    """Tests inject faults (a hanging step) and benches switch off end-of-sequence by wrapping the real backend:
    $TING_TEST_BACKEND_WRAPPER names a function that takes the backend and returns the one to use."""
    wrapper = os.environ.get(TEST_WRAPPER_ENV)
    if not wrapper:
        return backend
    module, name = wrapper.split(":")
    wrap: Callable[[Backend], Backend] = getattr(importlib.import_module(module), name)
    return wrap(backend)


def resolve_sampling(params: SamplingParams, prompt: Prompt, defaults: Defaults, max_model_len: int) -> Sampling:
    """Fill unset parameters from the checkpoint's generation config; refuse what the model cannot take.

    The ranges of each parameter are the wires' to check, in each protocol's words (api/*/convert.py); here they
    are invariants (a ValueError is a bug, not a user's error). What is the engine's own: the room its context
    leaves, and values torch cannot take (check_sampling)."""
    d = defaults
    room = max_model_len - len(prompt.token_ids)
    if room <= 0:
        raise InputTooLong(f"Range of input length should be [1, {max_model_len - 1}]")
    max_tokens = params.max_tokens if params.max_tokens is not None else room
    sampling = Sampling(
        max_tokens=min(max_tokens, room),
        temperature=d.temperature if params.temperature is None else params.temperature,
        top_p=d.top_p if params.top_p is None else params.top_p,
        top_k=d.top_k if params.top_k is None else params.top_k,
        repetition_penalty=d.repetition_penalty if params.repetition_penalty is None else params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        seed=secrets.randbelow(2**31) if params.seed is None else params.seed,
        stop=tuple(params.stop),
        stop_token_ids=frozenset(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
    )
    check_sampling(sampling)
    _assert_ranges(sampling)
    return sampling


def _assert_ranges(s: Sampling) -> None:
    if s.max_tokens < 1 or s.temperature < 0 or not 0 < s.top_p <= 1 or s.top_k < 0 or s.repetition_penalty <= 0:
        raise ValueError(f"sampling parameters out of range past the wire: {s}")


class Engine:
    def __init__(
        self, backend: Backend, *, max_batch_size: int = 16, max_queue: int = 256, prefill_token_budget: int = 1024
    ) -> None:
        self.backend = backend
        self._threads = 0  # set by use_threads
        self.scheduler = Scheduler(
            backend, max_batch_size=max_batch_size, max_queue=max_queue, prefill_token_budget=prefill_token_budget
        )

    @classmethod
    def load(
        cls,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        random_weights: bool = False,
        max_batch_size: int = 16,
        max_queue: int = 256,
        max_model_len: int = 8192,
        prefix_caching: bool = True,
        prefix_cache_slots: int = 0,
        encoder_cache_mib: int = 256,
    ) -> Engine:
        """Load a checkpoint directory or hub id."""
        from ting.engine import qwen2_audio

        backend = qwen2_audio.load(
            model,
            device=device,
            dtype=dtype,
            random_weights=random_weights,
            max_batch_size=max_batch_size,
            max_model_len=max_model_len,
            prefix_caching=prefix_caching,
            prefix_cache_slots=prefix_cache_slots,
            encoder_cache_bytes=encoder_cache_mib * 2**20,
        )
        return cls(apply_test_wrapper(backend), max_batch_size=max_batch_size, max_queue=max_queue)

    def use_threads(self, requested: int) -> int:
        """Torch's CPU threads for the model (0: auto, qwen2_audio.use_threads); the number set."""
        from ting.engine import qwen2_audio

        self._threads = qwen2_audio.use_threads(requested, self.backend)
        return self._threads

    def describe(self) -> dict[str, Any]:
        describe = getattr(self.backend, "describe", None)
        described: dict[str, Any] = describe() if describe else {}
        return {**described, "threads": self._threads} if self._threads else described

    @property
    def stats(self) -> Stats:
        return self.scheduler.stats

    @property
    def alive(self) -> bool:
        return self.scheduler.alive

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    async def prepare(self, messages: Sequence[Message]) -> Prompt:
        """Render the chat template, tokenize, extract audio features (off the event loop)."""
        return await on_prepare_threads(self.backend.prepare, messages)

    def resolve(self, params: SamplingParams, prompt: Prompt) -> Sampling:
        """Fill unset parameters from the checkpoint's generation config and check them."""
        return resolve_sampling(params, prompt, self.backend.defaults, self.backend.max_model_len)

    async def generate(
        self, prompt: Prompt, sampling: Sampling, *, request_id: str = "", cache_salt: str = ""
    ) -> AsyncGenerator[GenerationChunk]:
        """Stream the answer. Closing the iterator early (a client gone) aborts the request at once."""
        seq = self.scheduler.submit(request_id, with_salt(prompt, cache_salt), sampling)
        queue = seq.queue
        assert queue is not None
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not seq.finished:
                self.scheduler.abort(seq)


def with_salt(prompt: Prompt, cache_salt: str) -> Prompt:
    return dataclasses.replace(prompt, cache_salt=cache_salt) if cache_salt != prompt.cache_salt else prompt


def check_sampling(s: Sampling) -> None:
    """What the wire let through must still be something the model can take: checked before the request joins
    a batch, so that it fails alone and at once (400), not inside a batched pass on the engine thread."""
    floats = {
        "temperature": s.temperature,
        "top_p": s.top_p,
        "repetition_penalty": s.repetition_penalty,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
    }
    for name, value in floats.items():
        if not math.isfinite(value):
            raise InvalidParameter(f"{name} must be a finite number.")
    if isinstance(s.seed, bool) or not isinstance(s.seed, int) or not SEED_MIN <= s.seed <= SEED_MAX:
        raise InvalidParameter(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}].")
