"""Untrusted bytes -> 16 kHz mono float32, through FFmpeg (PyAV), isolated from the server.

The container is sniffed from the magic bytes (never from a name or a declared type) and the demuxer is
forced to that one, so playlist and concat demuxers that open further URLs can never run; the codec must
be on an allowlist. Decoding is driven by the packets actually read (no allocation from header claims),
stops once the output holds `max_samples`, and counts packets against a cap. Where a recording longer than the
limit is an error (transcription), its length is checked before anything is decoded: the container's declared
duration where it is written from what was encoded, else the packets' own durations, read without decoding them.
Whole recordings take at most all workers but one, so a chat's clip never queues behind them.

Decoding runs in a pool of worker processes: each has an address-space limit, a job that outlives its
wall-clock deadline has its worker killed and replaced, and a worker that crashes fails only its own job. The one
exception is plain 16 kHz mono 16-bit PCM WAV (wav.py), whose samples need no decoder: the pool makes their clip in
this process, the same clip bit for bit, for the cost of one numpy conversion instead of a worker's round trip.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import io
import logging
import os
import resource
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import av
import numpy as np

from ting import errors
from ting.audio import wav
from ting.types import MIN_SAMPLES, SAMPLE_RATE, WINDOW_SAMPLES, AudioClip

log = logging.getLogger("ting.audio")

MAX_PACKETS = 2_000_000  # a CPU bomb of tiny packets stops here (the wall-clock deadline also applies)
MAX_CHANNELS = 8
MIN_RATE_HZ, MAX_RATE_HZ = 1_000, 384_000
MAX_BAD_PACKETS = 200  # corrupt packets skipped before giving up

# The codecs the allowlist admits, by the name Ting reports; a decoder is named as its codec unless listed below.
_CODECS = frozenset(
    {
        "pcm_u8",
        "pcm_s8",
        "pcm_s16le",
        "pcm_s16be",
        "pcm_s24le",
        "pcm_s24be",
        "pcm_s32le",
        "pcm_s32be",
        "pcm_f32le",
        "pcm_f32be",
        "pcm_f64le",
        "pcm_f64be",
        "pcm_alaw",
        "pcm_mulaw",
        "adpcm_ima_wav",
        "adpcm_ms",
        "gsm_ms",
        "gsm",
        "mp3",
        "aac",
        "amr_nb",
        "amr_wb",
        "opus",
        "vorbis",
        "flac",
        "alac",
    }
)
_DECODER_CODEC = {
    "libgsm_ms": "gsm_ms",
    "libgsm": "gsm",
    "mp3float": "mp3",
    "aac_fixed": "aac",
    "aac_latm": "aac",
    "amrnb": "amr_nb",
    "libopencore_amrnb": "amr_nb",
    "amrwb": "amr_wb",
    "libopencore_amrwb": "amr_wb",
    "libopus": "opus",
    "libvorbis": "vorbis",
}
# Containers whose declared stream duration is exact (not estimated from the bit rate like ADTS or MP3).
_EXACT_DURATION = {"wav", "mov", "flac", "ogg", "matroska"}


def sniff(data: bytes) -> str:
    """The container of `data`, from its first bytes; raises InvalidAudio for anything not audio."""
    head = data[:64]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head.startswith(b"#!AMR"):  # "#!AMR\n" (narrow band) and "#!AMR-WB\n" (wide band)
        return "amr"
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mov"  # MP4, M4A, 3GP, 3GPP, MOV
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"  # WebM and MKV
    offset = 0
    if head[:3] == b"ID3" and len(data) >= 10:  # an ID3v2 tag may precede MP3 or ADTS frames
        size = (data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F)
        offset = 10 + size + (10 if data[5] & 0x10 else 0)
        if offset + 2 > len(data):
            raise errors.InvalidAudio()
    b0, b1 = (data[offset], data[offset + 1]) if len(data) >= offset + 2 else (0, 0)
    if b0 == 0xFF and (b1 & 0xF6) == 0xF0:  # ADTS: 12 sync bits, layer 00
        return "aac"
    if b0 == 0xFF and (b1 & 0xE0) == 0xE0 and (b1 >> 1) & 3 in (1, 2, 3):  # MPEG audio frame sync
        return "mp3"
    raise errors.InvalidAudio()


def decode_bytes(
    data: bytes, *, max_samples: int = WINDOW_SAMPLES, max_packets: int = MAX_PACKETS, refuse_longer: bool = False
) -> AudioClip:
    """Decode in this process. The server calls this only inside a DecoderPool worker.

    `refuse_longer`: audio longer than `max_samples` is an AudioTooLong error (found before decoding where the
    container tells), instead of being cut at `max_samples`."""
    if not data:
        raise errors.AudioEmpty()
    container_name = sniff(data)
    container = _open(data, container_name)
    try:
        if refuse_longer and _longer_than(data, container, container_name, max_samples / SAMPLE_RATE):
            raise wav.too_long(max_samples)
        decoded = _decode_container(container, container_name, max_samples, max_packets)
    finally:
        container.close()
    if refuse_longer and decoded.truncated:  # a header that understated the length: stopped at the limit
        raise wav.too_long(max_samples)
    return decoded


def _open(data: bytes, container_name: str) -> Any:
    try:
        return av.open(
            io.BytesIO(data),
            mode="r",
            format=container_name,  # the sniffed container is the demuxer's name
            options={"enable_drefs": "0", "use_absolute_path": "0"},
        )
    except (av.FFmpegError, ValueError, OSError):
        raise errors.InvalidAudio() from None


# Containers whose declared duration is written from what was encoded (a length an encoder cannot know in advance:
# Ogg's last granule position, MP4's moov, FLAC's STREAMINFO, Matroska's Duration). Other declared durations are
# estimates (MP3 and ADTS from the bit rate) or often bogus (WAV written to a pipe declares 4 GiB of data): past
# the limit, those are measured from the packets themselves.
_TRUSTED_DURATION = {"mov", "flac", "ogg", "matroska"}
ESTIMATE_MARGIN = 1.02
TRUSTED_MARGIN_S = 0.5  # encoder padding past a declared duration


def _longer_than(data: bytes, container: Any, container_name: str, limit_s: float) -> bool:
    """Whether the recording is longer than `limit_s`, known without decoding it. False: not known to be."""
    if not container.streams.audio:
        return False
    declared = _declared_duration(container, container.streams.audio[0])
    if declared is None:
        return False
    if container_name in _TRUSTED_DURATION:
        return declared > limit_s + TRUSTED_MARGIN_S
    return declared > limit_s * ESTIMATE_MARGIN and _packets_longer_than(data, container_name, limit_s)


def _packets_longer_than(data: bytes, container_name: str, limit_s: float) -> bool:
    """Sum the packets' durations, up to `limit_s`, in a container of its own: demuxing reads frame headers and
    skips the payload, nothing is decoded."""
    container = _open(data, container_name)
    try:
        stream = container.streams.audio[0]
        if stream.time_base is None:
            return False
        limit, total = limit_s / stream.time_base, 0
        for packet in container.demux(stream):
            if packet.duration is None or packet.duration <= 0:
                if packet.size:
                    return False  # packets without durations: only decoding can tell
                continue
            total += packet.duration
            if total > limit:
                return True
        return False
    except av.FFmpegError:
        return False
    finally:
        container.close()


def _decode_container(container: Any, container_name: str, max_samples: int, max_packets: int) -> AudioClip:
    if not container.streams.audio:
        raise errors.InvalidAudio("The audio format is illegal and cannot be opened: no audio track.")
    stream = container.streams.audio[0]
    decoder = stream.codec_context.name
    codec = _DECODER_CODEC.get(decoder, decoder)
    if codec not in _CODECS:
        raise errors.UnsupportedCodec(f"The audio format is not supported: codec {decoder}.")
    mono = _Mono()
    truncated = _decode_packets(container, stream, mono, max_samples, max_packets)
    if mono.total == 0:
        raise errors.InvalidAudio()
    samples = np.concatenate(mono.pieces) if len(mono.pieces) > 1 else mono.pieces[0]
    declared = _declared_duration(container, stream)
    if len(samples) > max_samples:
        samples = samples[:max_samples]
        truncated = True
    elif declared is not None and container_name in _EXACT_DURATION:
        # Encoders pad the last frame (AAC by up to 1024 samples); the container knows the true length.
        exact = round(declared * SAMPLE_RATE)
        if exact < len(samples) <= exact + SAMPLE_RATE // 10:
            samples = samples[:exact]
    np.clip(samples, -1.0, 1.0, out=samples)
    if len(samples) < MIN_SAMPLES:
        raise errors.AudioTooShort()
    return AudioClip(
        samples=np.ascontiguousarray(samples, dtype=np.float32),
        duration_s=declared if truncated else len(samples) / SAMPLE_RATE,
        truncated=truncated,
        container=container_name,
        codec=codec,
    )


def _decode_packets(container: Any, stream: Any, mono: _Mono, max_samples: int, max_packets: int) -> bool:
    """Demux and decode into `mono` until the end, `max_samples` (True: truncated) or too many bad packets. A
    damaged tail keeps what decoded."""
    packets = bad = 0
    try:
        for packet in container.demux(stream):
            packets += 1
            if packets > max_packets:
                raise errors.InvalidAudio("The audio format is illegal and cannot be opened: too many packets.")
            try:
                frames = packet.decode()
            except av.FFmpegError:
                bad += 1
                if bad > MAX_BAD_PACKETS:
                    break
                continue
            for frame in frames:
                mono.add(frame)
            if mono.total >= max_samples:
                return True
        mono.flush()
    except av.FFmpegError:
        pass
    return False


class _Mono:
    """16 kHz mono float32 pieces from decoded frames. A stream whose layout or sample rate changes mid-way gets
    the old resampler flushed and a new one."""

    def __init__(self) -> None:
        self.pieces: list[np.ndarray] = []
        self.total = 0
        self._resampler: Any = None
        self._layout = ""

    def add(self, frame: Any) -> None:
        _check_frame(frame)
        if self._resampler is None or frame.layout.name != self._layout:
            self._restart(frame)
        try:
            self._take(self._resampler.resample(frame))
        except ValueError:  # the sample rate changed mid-way
            self._restart(frame)
            self._take(self._resampler.resample(frame))

    def flush(self) -> None:
        if self._resampler is not None:
            self._take(self._resampler.resample(None))

    def _restart(self, frame: Any) -> None:
        self.flush()
        self._layout = frame.layout.name
        self._resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=SAMPLE_RATE)

    def _take(self, frames: list[Any]) -> None:
        for out in frames:
            mono = downmix(out.to_ndarray(), out.layout)
            self.pieces.append(mono)
            self.total += len(mono)


# Downmix weights by channel name; the result is divided by the sum of the weights, so it is a weighted
# mean of the channels and can never clip. Stereo becomes (L+R)/2; the LFE channel is dropped.
_DOWNMIX_WEIGHTS = {"FC": 1.0, "FL": 0.707, "FR": 0.707, "LFE": 0.0}
_SURROUND_WEIGHT = 0.5


def downmix(planes: np.ndarray, layout: Any) -> np.ndarray:
    """Mono from planar float samples shaped (channels, n)."""
    if planes.shape[0] == 1:
        return np.asarray(planes[0], dtype=np.float32).copy()
    names = [c.name for c in layout.channels]
    if len(names) != planes.shape[0]:
        names = [""] * planes.shape[0]  # unknown layout: a plain mean
    if set(names) <= {"FL", "FR", "LFE"}:  # stereo (2.1): L and R alike
        weights = np.array([0.0 if n == "LFE" else 1.0 for n in names], dtype=np.float32)
    else:
        weights = np.array([_DOWNMIX_WEIGHTS.get(n, _SURROUND_WEIGHT) for n in names], dtype=np.float32)
    weights /= weights.sum()
    return np.asarray(weights @ planes, dtype=np.float32)


def _check_frame(frame: Any) -> None:
    channels = frame.layout.nb_channels
    if not 0 < channels <= MAX_CHANNELS:
        raise errors.UnsupportedCodec(
            f"The audio format is not supported: {channels} channels (at most {MAX_CHANNELS})."
        )
    if not MIN_RATE_HZ <= frame.sample_rate <= MAX_RATE_HZ:
        raise errors.UnsupportedCodec(f"The audio format is not supported: sample rate {frame.sample_rate} Hz.")


def _declared_duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return float(container.duration) / 1_000_000
    return None


# --- the worker pool ---------------------------------------------------------------------------------------

_ERRORS: dict[str, type[errors.AudioError]] = {
    cls.__name__: cls
    for cls in (
        errors.AudioError,
        errors.AudioEmpty,
        errors.AudioTooShort,
        errors.AudioTooLong,
        errors.InvalidAudio,
        errors.UnsupportedCodec,
        errors.DecodeTimeout,
    )
}


def worker_main(jobs: Connection, results: Connection, memory_bytes: int) -> None:
    """The decoder worker's loop: one job at a time, until the pool closes the pipe."""
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    av.logging.set_level(None)
    while True:
        try:
            job = jobs.recv()
            data = jobs.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            decoded = decode_bytes(data, max_samples=job["max_samples"], refuse_longer=job.get("refuse_longer", False))
        except errors.AudioError as exc:
            results.send(("error", type(exc).__name__, exc.message))
        except MemoryError:
            results.send(("error", "InvalidAudio", "The audio could not be decoded within the memory limit."))
        except Exception:  # a decoder bug must not take the worker down silently
            results.send(("error", "InvalidAudio", errors.InvalidAudio.default_message))
        else:
            meta = (decoded.duration_s, decoded.truncated, decoded.container, decoded.codec)
            results.send(("ok", meta))
            results.send_bytes(decoded.samples.tobytes())


def child_main(job_fd: int, result_fd: int, memory_bytes: int, target: str) -> None:
    """Entry point of a worker process: `target` is "module:function", worker_main unless a test swaps it."""
    module, _, name = target.partition(":")
    function = getattr(importlib.import_module(module), name)
    function(Connection(job_fd, writable=False), Connection(result_fd, readable=False), memory_bytes)


class _Worker:
    """One decoder process: a clean interpreter (no fork of the server) talking over two pipes."""

    def __init__(self, target: str, memory_bytes: int) -> None:
        job_r, job_w = os.pipe()
        result_r, result_w = os.pipe()
        code = f"import ting.audio.decode as d; d.child_main({job_r}, {result_w}, {memory_bytes}, {target!r})"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            pass_fds=(job_r, result_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            close_fds=True,
        )
        os.close(job_r)
        os.close(result_w)
        self.jobs = Connection(job_w, readable=False)
        self.results = Connection(result_r, writable=False)

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait(5)
        self.jobs.close()
        self.results.close()


class DecoderPool:
    """A fixed set of decoder worker processes; `decode` runs one job on an idle one."""

    def __init__(
        self,
        workers: int = 2,
        *,
        timeout_s: float = 10.0,
        memory_mib: int = 2048,
        target: str = "ting.audio.decode:worker_main",  # tests inject a worker that crashes or hangs
    ) -> None:
        self.size = max(1, workers)
        self.timeout_s = timeout_s
        self.memory_bytes = memory_mib * 1024 * 1024
        self.target = target
        self.restarts = 0  # workers replaced after a crash or a timeout
        self._idle: asyncio.Queue[_Worker] | None = None
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        # Each job's thread waits on its worker's pipe: threads of the pool's own (one per worker, plus spawning
        # replacements), never the event loop's default executor, where other blocking work would queue with them.
        self._threads = ThreadPoolExecutor(self.size + 2, thread_name_prefix="ting-decode")
        self._long_jobs: asyncio.Semaphore | None = None

    async def start(self) -> None:
        self._idle = asyncio.Queue()
        self._threads = ThreadPoolExecutor(self.size + 2, thread_name_prefix="ting-decode")
        # Whole recordings (more than one 30 s window: transcriptions, up to 25 MiB each) take at most all workers but
        # one, so a chat's clip never queues behind them.
        self._long_jobs = asyncio.Semaphore(max(1, self.size - 1))
        loop = asyncio.get_running_loop()
        workers = await asyncio.gather(*(loop.run_in_executor(self._threads, self._spawn) for _ in range(self.size)))
        for w in workers:
            self._idle.put_nowait(w)

    def _spawn(self) -> _Worker:
        worker = _Worker(self.target, self.memory_bytes)
        with self._lock:
            self._all.add(worker)
        return worker

    def _retire(self, worker: _Worker) -> _Worker:
        worker.kill()
        with self._lock:
            self._all.discard(worker)
        self.restarts += 1
        return self._spawn()

    async def close(self) -> None:
        with self._lock:
            workers = list(self._all)
            self._all.clear()
        for w in workers:
            await asyncio.get_running_loop().run_in_executor(self._threads, w.kill)
        self._threads.shutdown(wait=False)

    @property
    def alive(self) -> int:
        with self._lock:
            return sum(w.alive() for w in self._all)

    async def decode(self, data: bytes, *, max_seconds: float = 30.0, refuse_longer: bool = False) -> AudioClip:
        """Decode one audio file in a worker; raises an AudioError for anything wrong with it.

        Audio longer than `max_seconds` is cut there, or with `refuse_longer` is an AudioTooLong error, found
        before decoding where the container tells (decode_bytes)."""
        if self._idle is None:
            raise RuntimeError("DecoderPool.start() was not called")
        if not data:
            raise errors.AudioEmpty()
        started = time.monotonic()
        plain = await self._plain_wav(data, int(max_seconds * SAMPLE_RATE), refuse_longer)
        if plain is not None:
            log.debug("decoded %d bytes of plain WAV in %.3f s", len(data), time.monotonic() - started)
            return plain
        long = self._long_jobs if max_seconds > WINDOW_SAMPLES / SAMPLE_RATE else None
        if long is not None:
            await long.acquire()
        try:
            worker = await self._idle.get()
        except BaseException:
            if long is not None:
                long.release()
            raise
        job = asyncio.ensure_future(
            asyncio.get_running_loop().run_in_executor(
                self._threads, self._run, worker, data, int(max_seconds * SAMPLE_RATE), refuse_longer
            )
        )
        job.add_done_callback(self._give_back)
        if long is not None:
            job.add_done_callback(lambda _: long.release())
        # The job owns its worker until the worker answers, even if this request is cancelled meanwhile.
        _, outcome = await asyncio.shield(job)
        if isinstance(outcome, BaseException):
            raise outcome
        log.debug("decoded %d bytes in %.3f s", len(data), time.monotonic() - started)
        return outcome

    async def _plain_wav(self, data: bytes, max_samples: int, refuse_longer: bool) -> AudioClip | None:
        """The clip of a plain 16 kHz mono 16-bit PCM WAV, made in this process (wav.py: the same clip, bit for bit,
        as a worker gives), or None for anything else. Converting more than one 30 s window's samples (a whole
        recording) runs on a thread of the pool's own, so the loop never spends more than about a millisecond here."""
        if max_samples < MIN_SAMPLES:
            return None
        payload = wav.plain_pcm(data)
        if payload is None:
            return None
        make = functools.partial(wav.clip_of, payload, max_samples=max_samples, refuse_longer=refuse_longer)
        if min(len(payload) // 2, max_samples) <= WINDOW_SAMPLES:
            return make()
        return await asyncio.get_running_loop().run_in_executor(self._threads, make)

    def _give_back(self, job: asyncio.Future[tuple[_Worker, Any]]) -> None:
        if self._idle is None or job.cancelled() or job.exception() is not None:
            return  # the loop is shutting down (or spawning a replacement failed): nothing to give back
        self._idle.put_nowait(job.result()[0])

    def _run(
        self, worker: _Worker, data: bytes, max_samples: int, refuse_longer: bool
    ) -> tuple[_Worker, AudioClip | BaseException]:
        try:
            worker.jobs.send({"max_samples": max_samples, "refuse_longer": refuse_longer})
            worker.jobs.send_bytes(data)
            if not worker.results.poll(self.timeout_s):
                log.warning("audio decoder timed out after %.1f s; replacing the worker", self.timeout_s)
                return self._retire(worker), errors.DecodeTimeout()
            reply = worker.results.recv()
            if reply[0] == "error":
                return worker, _ERRORS.get(reply[1], errors.InvalidAudio)(reply[2])
            samples = np.frombuffer(worker.results.recv_bytes(), dtype=np.float32)
        except (EOFError, OSError, struct.error, ValueError, TypeError, IndexError):
            log.warning("audio decoder worker died (exit code %s); replacing it", worker.process.poll())
            return self._retire(worker), errors.InvalidAudio(
                "The audio could not be decoded: the decoder failed on this file."
            )
        duration_s, truncated, container, codec = reply[1]
        return worker, AudioClip(
            samples=samples, duration_s=duration_s, truncated=truncated, container=container, codec=codec
        )
