"""The engine in its own process, seen from the server: `RemoteEngine`, an EngineClient like `Engine`.

The server process keeps what is light or concurrent: the chat template, tokenizing and the log-mel features
(`prepare`, on a thread, as before), resolving sampling defaults, and one asyncio queue per request. The model,
the KV cache, the scheduler, detokenization and stop strings live in the engine process (ting.engine.core), so
that no event-loop work ever delays a decoding step, and a crash of the model cannot take the server down.

A supervisor task watches the engine process. When it exits (kill -9, a segfault, an out-of-memory kill, an
exception that escapes) or makes no progress for `hang_timeout_s` while requests are in flight (then it is
killed), every request in flight ends at once with EngineDown (503 before the first byte, the protocol's error
event after it), /health reports the engine down, and a new engine process is started after a backoff that
doubles with each failure in a row (up to `max_backoff_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from ting.engine import on_prepare_threads, resolve_sampling, wire, with_salt
from ting.engine.backend import Prompt, Sampling
from ting.engine.scheduler import Stats
from ting.errors import EngineDown, ModelLoadError, Overloaded, ShuttingDown
from ting.types import GenerationChunk, Message, SamplingParams

log = logging.getLogger("ting.engine")

STABLE_S = 60.0  # an engine process up this long resets the backoff
STOP_TIMEOUT_S = 10.0  # after STOP, the engine process gets this long to exit before it is killed
DIR_PREFIX = "ting-engine-"  # the sockets' directory: ting-engine-<server pid>-<random>, in the temporary directory


def remove_stale_dirs() -> list[str]:
    """Remove this user's socket directories whose server is gone; the ones removed."""
    removed = []
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        pid = name.removeprefix(DIR_PREFIX).split("-", 1)[0]
        path = os.path.join(root, name)
        if not name.startswith(DIR_PREFIX) or not pid.isdigit() or _running(int(pid)):
            continue
        with contextlib.suppress(OSError):
            if os.stat(path).st_uid == os.getuid():
                shutil.rmtree(path)
                removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass(frozen=True)
class EngineOptions:
    path: str  # checkpoint directory
    device: str = "auto"
    dtype: str = "auto"
    random_weights: bool = False  # --load-format dummy
    max_batch_size: int = 16
    max_queue: int = 256
    max_model_len: int = 8192
    prefix_caching: bool = True  # reuse keys and values of earlier requests' prompts (same salt)
    prefix_cache_slots: int = 0  # KV-cache rows beyond max_batch_size that only hold finished sequences
    encoder_cache_mib: int = 256  # audio-encoder outputs kept by clip digest
    threads: int = 0  # torch's CPU threads in the engine process; 0: auto (qwen2_audio.use_threads)
    hang_timeout_s: float = 120.0  # no step for this long while requests are in flight: the engine is hung
    restart_timeout_s: float = 600.0  # a restarted engine not ready after this long is killed and tried again
    first_backoff_s: float = 0.5  # wait before the first restart; doubles with each failure in a row
    max_backoff_s: float = 30.0
    log_level: str = "info"


class _Child:
    """One engine process and its two pipes."""

    def __init__(
        self, generation: int, directory: str, options: EngineOptions, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.generation = generation
        requests_addr = f"ipc://{directory}/requests-{generation}"
        results_addr = f"ipc://{directory}/results-{generation}"
        self.requests: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUSH)  # sends never wait (no HWM)
        self.requests.setsockopt(zmq.SNDHWM, 0)
        self.requests.bind(requests_addr)
        self.results = zmq.asyncio.Context.instance().socket(zmq.PULL)
        self.results.setsockopt(zmq.RCVHWM, 0)
        self.results.bind(results_addr)
        config = {
            "path": options.path,
            "device": options.device,
            "dtype": options.dtype,
            "random_weights": options.random_weights,
            "max_batch_size": options.max_batch_size,
            "max_queue": options.max_batch_size + options.max_queue,
            "max_model_len": options.max_model_len,
            "prefix_caching": options.prefix_caching,
            "prefix_cache_slots": options.prefix_cache_slots,
            "encoder_cache_mib": options.encoder_cache_mib,
            "threads": options.threads,
            "requests": requests_addr,
            "results": results_addr,
            "parent_pid": os.getpid(),
            "log_level": options.log_level,
        }
        # Started from the event loop's thread: PR_SET_PDEATHSIG fires when the thread that started it ends.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ting.engine.core", json.dumps(config)], stdin=subprocess.DEVNULL
        )
        self.started_at = time.monotonic()
        self.exited = asyncio.Event()
        threading.Thread(target=self._wait, args=(loop,), name=f"ting-engine-wait-{self.proc.pid}", daemon=True).start()

    def _wait(self, loop: asyncio.AbstractEventLoop) -> None:
        self.proc.wait()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(self.exited.set)

    def send(self, frames: list[wire.Buffer]) -> None:
        self.requests.send_multipart(frames, copy=False)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)

    def close(self) -> None:
        self.requests.close(linger=0)
        self.results.close(linger=0)

    def describe_exit(self) -> str:
        code = self.proc.returncode
        if code is None:
            return "is still running"
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"


class RemoteEngine:
    """The EngineClient of an engine process: start it with `await open()`, stop it with `await aclose()`."""

    def __init__(self, options: EngineOptions) -> None:
        self.options = options
        self.state = "starting"  # starting | ready | restarting | stopped
        self.restarts = 0  # engine processes started after the first
        self.deaths = 0  # engine processes that died or hung
        self._ready: wire.Ready | None = None
        self._inputs: Any = None  # the checkpoint's processor (prepare)
        self._child: _Child | None = None
        self._reader: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._streams: dict[int, asyncio.Queue[GenerationChunk | BaseException]] = {}
        self._unfinished: set[int] = set()  # requests the engine still works on (not a slow reader's last chunks)
        self._ids = itertools.count(1)
        self._generations = itertools.count(1)
        self._stats = Stats()
        self._failures_in_a_row = 0
        remove_stale_dirs()
        # 0700: only this user reaches the sockets. The server's pid in the name: a later server removes the
        # directory of one that was killed (kill -9 leaves it behind: nobody is left to remove it).
        self._dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")

    # --- EngineClient ---------------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.state == "ready" and self._child is not None and self._child.proc.poll() is None

    @property
    def stats(self) -> Stats:
        return self._stats

    @property
    def pid(self) -> int | None:
        return self._child.proc.pid if self._child is not None else None

    def describe(self) -> dict[str, Any]:
        return dict(self._ready.describe) if self._ready is not None else {}

    async def prepare(self, messages: Sequence[Message]) -> Prompt:
        """Render the chat template, tokenize, extract audio features: in this process, off the event loop."""
        return await on_prepare_threads(self._inputs.prepare, messages)

    def resolve(self, params: SamplingParams, prompt: Prompt) -> Sampling:
        assert self._ready is not None
        return resolve_sampling(params, prompt, self._ready.defaults, self._ready.max_model_len)

    async def generate(
        self, prompt: Prompt, sampling: Sampling, *, request_id: str = "", cache_salt: str = ""
    ) -> AsyncGenerator[GenerationChunk]:
        """Stream the answer. Closing the iterator early (a client gone) aborts the request in the engine."""
        child = self._child
        if not self.alive or child is None:
            raise EngineDown(retry_after_s=self._next_backoff_s())
        if len(self._streams) >= self.options.max_batch_size + self.options.max_queue:
            raise Overloaded(retry_after_s=1.0)
        seq_id = next(self._ids)
        queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        if not self._unfinished:
            self._stats.last_progress = time.monotonic()  # the hang clock starts with the first request in flight
        self._streams[seq_id] = queue
        self._unfinished.add(seq_id)
        done = False
        try:
            child.send(wire.encode_add(seq_id, request_id, with_salt(prompt, cache_salt), sampling))
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                yield item
                if item.finish_reason is not None:
                    done = True
                    return
        finally:
            self._streams.pop(seq_id, None)
            self._unfinished.discard(seq_id)
            if not done and child is self._child and self.alive:
                child.send([wire.ABORT, wire.pack([seq_id])])

    # --- life ---------------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Load the processor here and the model in a new engine process; raises ModelLoadError if it cannot."""
        qwen2_audio = await asyncio.to_thread(importlib.import_module, "ting.engine.qwen2_audio")  # torch: seconds
        # Here torch only extracts features; with its default thread pool, the server's and the engine's pools
        # took the same cores and prepare took 2-4 times longer (bench/server.py, added TTFT at C=1).
        qwen2_audio.limit_threads(1)
        inputs = asyncio.ensure_future(asyncio.to_thread(qwen2_audio.load_inputs, self.options.path))
        try:
            await self._spawn()  # meanwhile, the processor loads here
        finally:
            self._inputs = await inputs
        self._supervisor = asyncio.create_task(self._supervise())

    async def aclose(self) -> None:
        """Stop the engine process (STOP, then SIGKILL if it does not exit) and fail anything still in flight."""
        self.state = "stopped"
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        child, self._child = self._child, None
        if child is not None:
            with contextlib.suppress(zmq.ZMQError):
                child.send([wire.STOP])
            try:
                await asyncio.wait_for(child.exited.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                log.warning("the engine process %d did not stop; killing it", child.proc.pid)
                child.kill()
                await child.exited.wait()
            await self._retire(child)
        self._fail_all(ShuttingDown())
        shutil.rmtree(self._dir, ignore_errors=True)

    async def _spawn(self, timeout_s: float | None = None) -> None:
        """Start an engine process and wait until its model is loaded (at most `timeout_s`: then it is killed)."""
        loop = asyncio.get_running_loop()
        child = _Child(next(self._generations), self._dir, self.options, loop)
        receiving = asyncio.ensure_future(child.results.recv_multipart(copy=False))
        exiting = asyncio.ensure_future(child.exited.wait())
        try:
            await asyncio.wait([receiving, exiting], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled (the server stops while the model loads): the process goes too
            receiving.cancel()
            exiting.cancel()
            child.kill()
            child.close()
            raise
        exiting.cancel()
        if not receiving.done():
            receiving.cancel()
            why = f"{child.describe_exit()} while loading the model"
            if not child.exited.is_set():
                child.kill()
                await child.exited.wait()
                why = f"did not load the model within {timeout_s:.0f} s: killed it"
            child.close()
            raise ModelLoadError(f"The engine process {why}.")
        frames = receiving.result()
        if frames[0].bytes == wire.FAILED:
            message = wire.unpack(frames[1].buffer)
            await child.exited.wait()
            child.close()
            raise ModelLoadError(message)
        self._ready = wire.decode_ready([f.buffer for f in frames])
        self._child = child
        self._reader = asyncio.create_task(self._read(child))
        self.state = "ready"
        log.info(
            "engine process %d ready (%s)",
            child.proc.pid,
            f"restart {self.restarts}" if self.restarts else "first start",
        )

    async def _read(self, child: _Child) -> None:
        """Results of each step, to the queue of each request."""
        while True:
            frames = await child.results.recv_multipart(copy=False)
            if frames[0].bytes != wire.STEP:
                continue
            stats, chunks, errors = wire.unpack(frames[1].buffer)
            s = self._stats
            if stats:
                wire.decode_stats(stats, s)
            s.last_progress = time.monotonic()
            for raw in chunks:
                seq_id, chunk = wire.decode_chunk(raw)
                if chunk.finish_reason is not None:
                    self._unfinished.discard(seq_id)
                queue = self._streams.get(seq_id)
                if queue is not None:
                    queue.put_nowait(chunk)
            for raw in errors:
                seq_id, error = wire.decode_error(raw)
                self._unfinished.discard(seq_id)
                queue = self._streams.get(seq_id)
                if queue is not None:
                    queue.put_nowait(error)

    async def _supervise(self) -> None:
        """Restart the engine process whenever it dies or hangs."""
        while True:
            child = self._child
            assert child is not None
            reason = await self._watch(child)
            self.deaths += 1
            self.state = "restarting"
            if time.monotonic() - child.started_at >= STABLE_S:
                self._failures_in_a_row = 0
            delay_s = self._next_backoff_s()
            self._failures_in_a_row += 1
            in_flight = len(self._streams)
            log.error(
                "the engine process %d %s; failing the %d requests in flight, restarting it in %.1f s",
                child.proc.pid,
                reason,
                in_flight,
                delay_s,
            )
            self._child = None
            await self._retire(child)
            self._fail_all(EngineDown(retry_after_s=delay_s))
            await self._restart(delay_s)

    async def _watch(self, child: _Child) -> str:
        """Wait until `child` exits (its cause) or hangs (then kill it)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.exited.wait(), 1.0)
            if child.exited.is_set():
                return child.describe_exit()
            silent_s = time.monotonic() - self._stats.last_progress
            if self._unfinished and silent_s > self.options.hang_timeout_s:
                child.kill()
                await child.exited.wait()
                return f"made no progress for {silent_s:.0f} s with requests in flight (hung): killed it"

    async def _restart(self, delay_s: float) -> None:
        while True:
            await asyncio.sleep(delay_s)
            self.restarts += 1
            try:
                # The first start is not bounded (it may download the weights); a restart reloads what is here.
                await self._spawn(self.options.restart_timeout_s)
                return
            except ModelLoadError as exc:
                delay_s = self._next_backoff_s()
                self._failures_in_a_row += 1
                log.error("the engine process could not start (%s); trying again in %.1f s", exc.message, delay_s)

    def _next_backoff_s(self) -> float:
        o = self.options
        return float(min(o.max_backoff_s, o.first_backoff_s * 2**self._failures_in_a_row))

    async def _retire(self, child: _Child) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        child.close()

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        self._unfinished.clear()
        for queue in streams.values():
            queue.put_nowait(error)
        self._stats.running = self._stats.waiting = 0
