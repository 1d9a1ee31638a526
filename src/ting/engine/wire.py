"""What crosses between the server process and the engine process (ting.engine.process <-> ting.engine.core).

Every message is a ZeroMQ multipart message: a one-byte kind, a msgpack header, and for a new request the audio
features as one raw buffer (never a msgpack list of floats). Two PUSH/PULL pipes, one each way, over ipc://
sockets in a private directory:

  server -> engine   ADD   [seq id, request id, prompt tokens, audio tokens per clip, sampling, features layout,
                            audio digest per clip, cache salt]
                           + the log-mel features (float32, each clip cut after the last frame the encoder reads)
                     ABORT [seq ids]
                     STOP  []
  engine -> server   READY {describe, defaults, max_model_len}        once, when the model is loaded
                     FAILED message                                   the model could not be loaded
                     STEP  [stats, chunks, errors]                    once per prefill or decoding step: every
                                                                      request's new tokens and text together
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass
from typing import Any

import msgpack
import numpy as np

from ting import errors
from ting.engine.backend import CacheStats, Defaults, Prompt, Sampling
from ting.engine.scheduler import Stats
from ting.errors import EngineError, Overloaded, TingError
from ting.types import GenerationChunk, Usage

ADD, ABORT, STOP = b"A", b"X", b"S"
READY, FAILED, STEP = b"R", b"F", b"O"

# The audio encoder reads a clip's mel frames up to `frames + 1` (its convolutions look one frame ahead, and the
# second has stride 2: qwen2_audio.Qwen2AudioBackend._encode_clips). Frames past that are padding it never uses,
# so they do not cross; the engine fills them with zeros (a 5 s clip: 502 of the window's 3000 frames).
FRAMES_READ_PAST_END = 2

Buffer = bytes | memoryview


def pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def unpack(data: Buffer) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# --- requests: server -> engine ------------------------------------------------------------------------------


def encode_add(seq_id: int, request_id: str, prompt: Prompt, sampling: Sampling) -> list[Buffer]:
    layout, buffers = _encode_features(prompt.inputs)
    header = [
        seq_id,
        request_id,
        list(prompt.token_ids),
        list(prompt.audio_tokens),
        _encode_sampling(sampling),
        layout,
        list(prompt.audio_hashes),
        prompt.cache_salt,
    ]
    return [ADD, pack(header), *buffers]


def decode_add(frames: Sequence[Buffer]) -> tuple[int, str, Prompt, Sampling]:
    seq_id, request_id, token_ids, audio_tokens, sampling, layout, audio_hashes, cache_salt = unpack(frames[1])
    inputs = _decode_features(layout, frames[2]) if layout is not None else None
    prompt = Prompt(
        token_ids=tuple(token_ids),
        audio_tokens=tuple(audio_tokens),
        inputs=inputs,
        audio_hashes=tuple(audio_hashes),
        cache_salt=cache_salt,
    )
    return seq_id, request_id, prompt, _decode_sampling(sampling)


def _encode_features(inputs: Any) -> tuple[list[Any] | None, list[Buffer]]:
    if not inputs:
        return None, []
    features = np.asarray(inputs["input_features"])  # (clips, mel bins, window frames); a CPU tensor converts
    mask = np.asarray(inputs["feature_attention_mask"])  # (clips, window frames): 1 for each real frame
    frames = mask.sum(-1).astype(int).tolist()
    kept = min(features.shape[-1], max(frames) + FRAMES_READ_PAST_END)
    cut = np.ascontiguousarray(features[..., :kept], dtype=np.float32)
    layout = [list(features.shape), kept, frames, str(mask.dtype)]
    return layout, [memoryview(cut).cast("B")]  # type: ignore[arg-type]  # (numpy arrays are buffers)


def _decode_features(layout: list[Any], buffer: Buffer) -> dict[str, np.ndarray]:
    shape, kept, frames, mask_dtype = layout
    clips, bins, width = shape
    features = np.zeros(shape, dtype=np.float32)
    features[..., :kept] = np.frombuffer(buffer, dtype=np.float32).reshape(clips, bins, kept)
    mask = np.zeros((clips, width), dtype=mask_dtype)
    for i, n in enumerate(frames):
        mask[i, :n] = 1
    return {"input_features": features, "feature_attention_mask": mask}


def _encode_sampling(s: Sampling) -> list[Any]:
    return [
        s.max_tokens,
        s.temperature,
        s.top_p,
        s.top_k,
        s.repetition_penalty,
        s.presence_penalty,
        s.frequency_penalty,
        s.seed,
        list(s.stop),
        sorted(s.stop_token_ids),
        s.ignore_eos,
    ]


def _decode_sampling(v: list[Any]) -> Sampling:
    return Sampling(
        max_tokens=v[0],
        temperature=v[1],
        top_p=v[2],
        top_k=v[3],
        repetition_penalty=v[4],
        presence_penalty=v[5],
        frequency_penalty=v[6],
        seed=v[7],
        stop=tuple(v[8]),
        stop_token_ids=frozenset(v[9]),
        ignore_eos=v[10],
    )


# --- results: engine -> server -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """What the engine process says once its model is loaded."""

    describe: dict[str, Any]
    defaults: Defaults
    max_model_len: int


def encode_ready(describe: dict[str, Any], defaults: Defaults, max_model_len: int) -> list[Buffer]:
    d = defaults
    return [READY, pack([describe, [d.temperature, d.top_p, d.top_k, d.repetition_penalty], max_model_len])]


def decode_ready(frames: Sequence[Buffer]) -> Ready:
    describe, d, max_model_len = unpack(frames[1])
    return Ready(describe, Defaults(*d), max_model_len)


def encode_chunk(seq_id: int, c: GenerationChunk) -> list[Any]:
    u = c.usage
    usage = [u.input_tokens, u.audio_tokens, u.output_tokens, u.cached_tokens]
    return [seq_id, list(c.token_ids), c.text, c.finish_reason, *usage]


def decode_chunk(v: list[Any]) -> tuple[int, GenerationChunk]:
    seq_id, token_ids, text, finish, input_tokens, audio_tokens, output_tokens, cached_tokens = v
    return seq_id, GenerationChunk(
        text=text,
        token_ids=tuple(token_ids),
        finish_reason=finish,
        usage=Usage(input_tokens, audio_tokens, output_tokens, cached_tokens),
    )


def encode_stats(s: Stats) -> list[Any]:
    """The scheduler's counters, as a STEP message carries them."""
    return [s.running, s.waiting, s.steps, s.generated_tokens, s.aborted, list(astuple(s.cache))]


def decode_stats(v: list[Any], into: Stats) -> None:
    into.running, into.waiting, into.steps, into.generated_tokens, into.aborted, cache = v
    into.cache = CacheStats(*cache)


def encode_error(seq_id: int, exc: BaseException) -> list[Any]:
    message = exc.message if isinstance(exc, TingError) else f"The model failed on this request ({type(exc).__name__})."
    return [seq_id, type(exc).__name__, message]


def decode_error(v: list[Any]) -> tuple[int, TingError]:
    """The engine's error as the server raises it: the same kind of TingError (ShuttingDown stays a 503), else an
    EngineError with the engine's message."""
    seq_id, kind, message = v
    known = getattr(errors, kind, None)
    if isinstance(known, type) and issubclass(known, TingError) and known is not TingError:
        error = known(message)
        error.retry_after_s = 1.0 if known is Overloaded else None
        return seq_id, error
    return seq_id, EngineError(message)
