"""Continuous batching on the engine's own thread.

One loop: drop aborted sequences, admit waiting ones while slots and the prefill budget allow (their prompts
are prefilled, the audio encoder batched across them), then one decoding step for every running sequence.
New requests join and finished ones leave between steps; nobody waits for a batch to drain. The admission
queue is bounded: past it, submit() raises Overloaded at once. A prefill of several prompts that fails is
retried prompt by prompt, so a request whose input the model cannot take fails alone, never its batch-mates.

Results go back to asyncio through `loop.call_soon_threadsafe`, one GenerationChunk per generated token; or,
in the engine process, to a `sink` that gathers them and to `publish`, called once the results of a prefill or a
decoding step are all in (one message per step: ting.engine.core).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ting.engine.backend import Backend, CacheStats, Prompt, Sampling
from ting.engine.detokenize import IncrementalDecoder
from ting.errors import EngineError, Overloaded, ShuttingDown
from ting.types import FinishReason, GenerationChunk, Usage

log = logging.getLogger("ting.engine")


@dataclass(eq=False)
class Sequence:
    """One request inside the engine."""

    id: int
    request_id: str
    prompt: Prompt
    sampling: Sampling
    loop: asyncio.AbstractEventLoop | None  # None: results go to `sink`
    queue: asyncio.Queue[GenerationChunk | BaseException] | None
    decoder: IncrementalDecoder
    sink: Callable[[Sequence, GenerationChunk | BaseException], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens the backend reused from its prefix cache
    finished: bool = False

    def emit(self, item: GenerationChunk | BaseException) -> None:
        if self.sink is not None:
            self.sink(self, item)
            return
        assert self.loop is not None and self.queue is not None
        with contextlib.suppress(RuntimeError):  # RuntimeError: the caller's event loop is gone
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class Stats:
    running: int = 0
    waiting: int = 0
    steps: int = 0  # decoding steps taken
    generated_tokens: int = 0
    aborted: int = 0
    last_progress: float = field(default_factory=time.monotonic)
    cache: CacheStats = field(default_factory=CacheStats)  # the backend's prefix and audio-encoder caches


class Scheduler:
    def __init__(
        self,
        backend: Backend,
        *,
        max_batch_size: int = 16,
        max_queue: int = 256,
        prefill_token_budget: int = 1024,  # prompt tokens prefilled between two decoding steps (at least one prompt)
        publish: Callable[[], None] | None = None,  # called on the engine thread once a step's results are emitted
    ) -> None:
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_token_budget = prefill_token_budget
        self.stats = Stats()
        self._ids = itertools.count(1)
        self._waiting: deque[Sequence] = deque()
        self._running: dict[int, Sequence] = {}
        self._aborts: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._publish = publish or (lambda: None)

    # --- called from the event loop ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ting-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(
        self,
        request_id: str,
        prompt: Prompt,
        sampling: Sampling,
        *,
        seq_id: int | None = None,
        sink: Callable[[Sequence, GenerationChunk | BaseException], None] | None = None,
    ) -> Sequence:
        """Queue a request. Its results go to the caller's event loop, or to `sink` (from any thread)."""
        loop = asyncio.get_running_loop() if sink is None else None
        seq = Sequence(
            id=next(self._ids) if seq_id is None else seq_id,
            request_id=request_id,
            prompt=prompt,
            sampling=sampling,
            loop=loop,
            queue=asyncio.Queue() if sink is None else None,
            decoder=IncrementalDecoder(self.backend.detokenize, sampling.stop),
            sink=sink,
        )
        with self._lock:
            if self._stopping:
                raise ShuttingDown()
            if not self.alive:
                raise EngineError("The engine is not running.")
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(retry_after_s=1.0)
            self._waiting.append(seq)
            self.stats.waiting = len(self._waiting)
        self._wake.set()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop generating for `seq`; its slot is free before the next step."""
        self.abort_id(seq.id, finished=seq.finished)

    def abort_id(self, seq_id: int, *, finished: bool = False) -> None:
        with self._lock:
            if not finished:
                self._aborts.add(seq_id)
        self._wake.set()

    # --- the engine thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._drop_aborted()
                admitted = self._admit()
                if self._running:
                    self._step()
                elif not admitted:
                    self._wake.wait(0.5)
                    self._wake.clear()
            except Exception as exc:  # a bug must fail the requests in flight, never strand them
                log.exception("engine loop failed; failing the %d running requests", len(self._running))
                self._fail_running(exc)
            self._publish()
        with self._lock:
            leftovers = [*self._running.values(), *self._waiting]
            self._running.clear()
            self._waiting.clear()
        for seq in leftovers:
            seq.emit(ShuttingDown())
        self._publish()

    def _drop_aborted(self) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            if aborts:
                self._waiting = deque(s for s in self._waiting if s.id not in aborts)
        for seq_id in aborts:
            seq = self._running.pop(seq_id, None)
            if seq is not None:
                self.backend.release(seq_id)
                seq.finished = True
                self.stats.aborted += 1
        self._update_counts()

    def _admit(self) -> bool:
        batch: list[Sequence] = []
        tokens = 0
        with self._lock:
            while self._waiting and len(self._running) + len(batch) < self.max_batch_size:
                nxt = self._waiting[0]
                if batch and tokens + len(nxt.prompt.token_ids) > self.prefill_token_budget:
                    break
                batch.append(self._waiting.popleft())
                tokens += len(nxt.prompt.token_ids)
        if not batch:
            return False
        pending = {s.id: s for s in batch}
        try:
            self._prefill(batch, pending)
        except Exception as exc:
            if len(pending) > 1:  # one bad prompt must not fail its batch-mates: each again, by itself
                log.warning(
                    "a prefill of %d prompts failed (%s: %s); prefilling them one by one",
                    len(pending),
                    type(exc).__name__,
                    exc,
                )
                self._prefill_alone(list(pending.values()))
            else:
                self._fail_prefill(list(pending.values()), exc)
        self._update_counts()
        return True

    def _prefill(self, batch: list[Sequence], pending: dict[int, Sequence]) -> None:
        """Prefill `batch`; each sequence leaves `pending` (and starts running) as its first token comes."""
        cached = getattr(self.backend, "cached_tokens", None)
        for seq_id, token in self.backend.prefill([(s.id, s.prompt, s.sampling) for s in batch]):
            s = pending.pop(seq_id)
            s.cached_tokens = cached(seq_id) if cached is not None else 0
            self._running[s.id] = s
            self._advance(s, token)  # its first token goes out now, before the next prompt's prefill
            self._publish()

    def _prefill_alone(self, batch: list[Sequence]) -> None:
        for s in batch:
            self._safe_release(s.id)  # whatever the failed pass had started for it
        for s in batch:
            try:
                self._prefill([s], {s.id: s})
            except Exception as exc:
                self._fail_prefill([s], exc)

    def _fail_prefill(self, failed: list[Sequence], exc: BaseException) -> None:
        log.error("prefill failed for %s", ", ".join(s.request_id or str(s.id) for s in failed), exc_info=exc)
        for s in failed:
            self._safe_release(s.id)
            s.finished = True
            s.emit(EngineError(f"The model failed on this request ({type(exc).__name__})."))

    def _step(self) -> None:
        try:
            tokens = self.backend.step()
        except Exception as exc:
            log.exception("decoding step failed; failing the %d running requests", len(self._running))
            self._fail_running(exc)
            return
        self.stats.steps += 1
        for seq_id, token in tokens.items():
            s = self._running.get(seq_id)
            if s is not None:
                self._advance(s, token)
        self._update_counts()

    def _advance(self, s: Sequence, token: int) -> None:
        """Account for one new token of `s`: emit its text, and finish `s` if it is done."""
        s.output_ids.append(token)
        self.stats.generated_tokens += 1
        self.stats.last_progress = time.monotonic()
        finish: FinishReason | None = None
        if (token in self.backend.eos_token_ids and not s.sampling.ignore_eos) or token in s.sampling.stop_token_ids:
            text, finish = s.decoder.flush(), "stop"
        else:
            text = s.decoder.push(token)
            if s.decoder.stopped:
                finish = "stop"
            elif (
                len(s.output_ids) >= s.sampling.max_tokens
                or len(s.prompt.token_ids) + len(s.output_ids) >= self.backend.max_model_len
            ):
                text, finish = text + s.decoder.flush(), "length"
        usage = Usage(
            input_tokens=s.prompt.text_tokens,
            audio_tokens=sum(s.prompt.audio_tokens),
            output_tokens=len(s.output_ids),
            cached_tokens=s.cached_tokens,
        )
        s.emit(GenerationChunk(text=text, token_ids=(token,), finish_reason=finish, usage=usage))
        if finish is not None:
            s.finished = True
            self._running.pop(s.id, None)
            self._safe_release(s.id)

    def _fail_running(self, exc: BaseException) -> None:
        for seq_id, s in list(self._running.items()):
            self._safe_release(seq_id)
            s.finished = True
            s.emit(EngineError(f"The model failed on this request ({type(exc).__name__})."))
        self._running.clear()
        self._update_counts()

    def _safe_release(self, seq_id: int) -> None:
        try:
            self.backend.release(seq_id)
        except Exception:
            log.exception("releasing sequence %d failed", seq_id)

    def _update_counts(self) -> None:
        self.stats.running = len(self._running)
        self.stats.waiting = len(self._waiting)
        cache_stats = getattr(self.backend, "cache_stats", None)
        if cache_stats is not None:
            self.stats.cache = cache_stats()
