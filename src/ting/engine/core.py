"""The engine process: `python -m ting.engine.core CONFIG_JSON`, started by ting.engine.process.

It loads the backend, runs the Scheduler on its engine thread exactly as an in-process Engine does, and talks
to the server process over two ZeroMQ pipes (ting.engine.wire). Two threads:

* the main thread reads requests (ADD, ABORT, STOP) and hands them to the scheduler;
* the engine thread runs the scheduler; results gather in an outbox as the scheduler emits them, and go out
  as one STEP message when a prefill or decoding step is done (`publish`).

Detokenization and stop strings stay here, inside the scheduler (a stop string ends a request before another
token is spent on it). The process dies with its parent: PR_SET_PDEATHSIG on Linux, and a check of the parent's
pid every second anywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

import zmq

from ting.engine import apply_test_wrapper, wire
from ting.engine.backend import Backend
from ting.engine.scheduler import Scheduler, Sequence
from ting.errors import TingError
from ting.types import GenerationChunk

log = logging.getLogger("ting.engine")

PARENT_CHECK_MS = 1000


class EngineCore:
    """The scheduler and the two pipes."""

    def __init__(self, backend: Backend, results: zmq.Socket[bytes], *, max_batch_size: int, max_queue: int) -> None:
        self.results = results
        self._send_lock = threading.Lock()  # the socket is used by the engine thread, and by the main thread for
        self._outbox_lock = threading.Lock()  # refusals at submission
        self._chunks: list[list[Any]] = []
        self._errors: list[list[Any]] = []
        self._sent_stats: list[Any] = []
        self.scheduler = Scheduler(backend, max_batch_size=max_batch_size, max_queue=max_queue, publish=self.publish)

    def collect(self, seq: Sequence, item: GenerationChunk | BaseException) -> None:
        with self._outbox_lock:
            if isinstance(item, BaseException):
                self._errors.append(wire.encode_error(seq.id, item))
            else:
                self._chunks.append(wire.encode_chunk(seq.id, item))

    def publish(self) -> None:
        """One STEP message: every result since the last one, and the counters (if anything changed)."""
        stats = wire.encode_stats(self.scheduler.stats)
        with self._outbox_lock:
            chunks, self._chunks = self._chunks, []
            errors, self._errors = self._errors, []
        if not chunks and not errors and stats == self._sent_stats:
            return
        self._sent_stats = stats
        self.send([wire.STEP, wire.pack([stats, chunks, errors])])

    def send(self, frames: list[wire.Buffer]) -> None:
        with self._send_lock:
            self.results.send_multipart(frames, copy=False)

    def serve(self, requests: zmq.Socket[bytes], parent_pid: int) -> None:
        """Read requests until STOP, or until the server process is gone."""
        self.scheduler.start()
        while True:
            if not requests.poll(PARENT_CHECK_MS):
                if os.getppid() != parent_pid:
                    log.error("the server process is gone; the engine stops")
                    return
                continue
            frames = requests.recv_multipart(copy=False)
            kind = frames[0].bytes
            if kind == wire.STOP:
                return
            if kind == wire.ABORT:
                for seq_id in wire.unpack(frames[1].buffer):
                    self.scheduler.abort_id(seq_id)
            elif kind == wire.ADD:
                self._add([f.buffer for f in frames])

    def _add(self, frames: list[memoryview]) -> None:
        seq_id, request_id, prompt, sampling = wire.decode_add(frames)
        try:
            self.scheduler.submit(request_id, prompt, sampling, seq_id=seq_id, sink=self.collect)
        except TingError as exc:
            self.send([wire.STEP, wire.pack([self._sent_stats, [], [wire.encode_error(seq_id, exc)]])])

    def stop(self) -> None:
        self.scheduler.stop()


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this process when its parent dies (the pid check in `serve` covers the rest)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def load_backend(config: dict[str, Any]) -> Backend:
    from ting.engine import qwen2_audio

    backend: Backend = qwen2_audio.load(
        config["path"],
        device=config["device"],
        dtype=config["dtype"],
        random_weights=config["random_weights"],
        max_batch_size=config["max_batch_size"],
        max_model_len=config["max_model_len"],
        prefix_caching=config.get("prefix_caching", True),
        prefix_cache_slots=config.get("prefix_cache_slots", 0),
        encoder_cache_bytes=config.get("encoder_cache_mib", 256) * 2**20,
    )
    return apply_test_wrapper(backend)


def main(argv: list[str] | None = None) -> int:
    config = json.loads((argv or sys.argv[1:])[0])
    die_with_parent(config["parent_pid"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server stops us
    logging.basicConfig(
        level=config.get("log_level", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s[engine %(process)d]: %(message)s",
    )
    context = zmq.Context()
    requests = context.socket(zmq.PULL)
    requests.connect(config["requests"])
    results = context.socket(zmq.PUSH)
    results.connect(config["results"])
    try:
        backend = load_backend(config)
    except Exception as exc:
        message = exc.message if isinstance(exc, TingError) else f"{type(exc).__name__}: {exc}"
        results.send_multipart([wire.FAILED, wire.pack(message)])
        results.close(linger=5000)
        return 1
    from ting.engine import qwen2_audio

    threads = qwen2_audio.use_threads(config.get("threads", 0), backend)
    log.info("the model's operations use %d CPU thread%s", threads, "" if threads == 1 else "s")
    core = EngineCore(backend, results, max_batch_size=config["max_batch_size"], max_queue=config["max_queue"])
    describe = getattr(backend, "describe", None)
    described = {**(describe() if describe else {}), "threads": threads}
    core.send(wire.encode_ready(described, backend.defaults, backend.max_model_len))
    try:
        core.serve(requests, config["parent_pid"])
    finally:
        core.stop()
        results.close(linger=1000)
        requests.close(linger=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
