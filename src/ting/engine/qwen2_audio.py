"""Qwen2-Audio through transformers: the only module that runs torch.

The model is transformers' own Qwen2AudioForConditionalGeneration; this backend drives its parts the way
`generate()` does, plus what `generate()` lacks for serving:

* a slot KV cache: every running sequence owns a row of one preallocated tensor per layer, rows kept
  contiguous (a finished sequence's row is filled by the last one), so a decoding step for the whole batch
  is one forward pass over views of the cache, with each row's own positions and a mask for ragged lengths;
* prefill one prompt at a time (bit-for-bit the pass `generate()` makes), with the audio encoder batched
  across every clip of every prompt admitted together;
* logits only for the positions that are sampled (the reference computes lm_head over the whole prompt);
* sampling vectorised across the batch, with a private random generator per request (same seed, same
  answer, whatever else is batched alongside).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoProcessor, GenerationConfig, Qwen2AudioForConditionalGeneration
from transformers.masking_utils import create_bidirectional_mask

from ting.engine.backend import CacheStats, Defaults, Prompt, Sampling
from ting.engine.prompt import template_messages
from ting.engine.wire import FRAMES_READ_PAST_END
from ting.errors import InvalidParameter, ModelLoadError
from ting.types import HOP_SAMPLES, SAMPLE_RATE, WINDOW_FRAMES, WINDOW_SAMPLES, Message, audio_tokens_for_frames

log = logging.getLogger("ting.engine")

ENCODER_BATCH = 8  # clips per audio-encoder call (a 30 s window each)
SKINNY_CHUNK = 1024  # weight rows per product in a batched CPU decoding step
CACHE_GROWTH = 256  # KV-cache length grows in steps of this many tokens
ENCODER_CACHE_BYTES = 256 * 2**20  # audio-encoder outputs kept, by their size (a 30 s clip: 12 MiB real-width, fp32)
FEATURE_CACHE_BYTES = 64 * 2**20  # clips' log-mel features kept by prepare (a 30 s clip: 1.5 MiB)
AUDIO_MARKERS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


# --- loading -----------------------------------------------------------------------------------------------


def resolve_checkpoint(model: str) -> Path:
    """A local checkpoint directory for `model`: a path, or a hub id from the local cache or downloaded."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") != 1:
        raise ModelLoadError(
            f"No checkpoint directory at {model!r}. Pass a directory holding config.json, or a "
            f"hub id such as Qwen/Qwen2-Audio-7B-Instruct."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=CHECKPOINT_FILES, local_files_only=True))
    except Exception:
        pass  # not cached (or only partly): download it
    how = (
        f"Download it where the hub is reachable (`hf download {model}`) and copy the Hugging Face cache "
        f"(~/.cache/huggingface) here, or pass --model /path/to/checkpoint. For an offline test model, "
        f"use --model tiny."
    )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelLoadError(f"Model {model} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. {how}")
    log.info("downloading %s from the Hugging Face hub", model)
    try:
        return Path(snapshot_download(model, allow_patterns=CHECKPOINT_FILES))
    except Exception as exc:
        raise ModelLoadError(
            f"Model {model} is not in the local Hugging Face cache and could not be downloaded "
            f"({type(exc).__name__}). {how}"
        ) from None


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"Unknown device {device!r}: use auto, cpu, cuda or cuda:N.") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but torch sees no CUDA device.")
    return chosen


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ModelLoadError(f"Unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16.")
    return table[dtype]


def load(
    model: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    random_weights: bool = False,
    max_batch_size: int = 16,
    max_model_len: int = 8192,
    prefix_caching: bool = True,
    prefix_cache_slots: int = 0,
    encoder_cache_bytes: int = ENCODER_CACHE_BYTES,
) -> Qwen2AudioBackend:
    """Load a checkpoint (directory or hub id). `random_weights` makes weights at load time (benchmarks)."""
    path = resolve_checkpoint(model)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    try:
        processor = AutoProcessor.from_pretrained(path)
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        if random_weights or not has_weights:
            if not random_weights:
                raise ModelLoadError(
                    f"{path} holds no weights (*.safetensors). Serve it with --load-format dummy "
                    f"for random weights, or point --model at a full checkpoint."
                )
            config = AutoConfig.from_pretrained(path)
            torch.manual_seed(0)
            with dev:
                net = Qwen2AudioForConditionalGeneration._from_config(config, dtype=dt)
        else:
            net = Qwen2AudioForConditionalGeneration.from_pretrained(path, dtype=dt)
            net = net.to(dev)  # type: ignore[arg-type]  # (transformers' stubs: .to(device) is fine)
        try:
            generation = GenerationConfig.from_pretrained(path)
        except OSError:
            generation = GenerationConfig()
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"Could not load a Qwen2-Audio checkpoint from {path}: {exc}") from exc
    net.eval()
    return Qwen2AudioBackend(
        net,
        processor,
        generation,
        device=dev,
        dtype=dt,
        max_batch_size=max_batch_size,
        max_model_len=max_model_len,
        path=path,
        prefix_caching=prefix_caching,
        prefix_cache_slots=prefix_cache_slots,
        encoder_cache_bytes=encoder_cache_bytes,
    )


# --- small-batch matrix products on CPU ------------------------------------------------------------------


class _Decoding:
    active = False  # set while a batched decoding step runs on CPU


def _skinny_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear for a decoding step of a few rows.

    MKL's GEMM for x @ W.T with 2 to 64 rows repacks all of W on every call. oneDNN with the weight kept in its
    blocked layout does not (a second copy of the weights, made once); without oneDNN, W @ x.T taken 1024 rows
    of W at a time avoids most of it. At 4 to 64 rows of the real model's shapes the blocked product is 1.3 to 4.3
    times faster than MKL's, the chunked one 1.1 to 2.7 times (bench/linear.py, bench/RESULTS.md). The blocked
    copy is made only where it fits in memory. Prefill and single-row steps keep transformers' own path.
    """
    rows = x.numel() // x.shape[-1]
    if _Decoding.active and 1 < rows <= 64:
        x2d = x.reshape(rows, x.shape[-1])
        packed = getattr(self, "_ting_blocked", None)
        y = blocked_linear(x2d, packed) if packed is not None else chunked_linear(x2d, self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)
    return torch.nn.functional.linear(x, self.weight, self.bias)


def blocked_linear(x2d: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """x2d @ W.T + b with (W, b) already in oneDNN's blocked layout (`.to_mkldnn()`)."""
    return torch._C._nn.mkldnn_linear(x2d.to_mkldnn(), *packed).to_dense()


def chunked_linear(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x2d @ W.T + b as W @ x2d.T, SKINNY_CHUNK rows of W at a time (no repacking of W, no extra memory)."""
    xt = x2d.t()
    out = torch.empty(weight.shape[0], x2d.shape[0], dtype=x2d.dtype, device=x2d.device)
    for i in range(0, weight.shape[0], SKINNY_CHUNK):
        torch.mm(weight[i : i + SKINNY_CHUNK], xt, out=out[i : i + SKINNY_CHUNK])
    if bias is not None:
        out += bias[:, None]
    return out.t()


def available_memory_bytes() -> int | None:
    """Memory this process can still take: MemAvailable, or less under a cgroup (container) limit."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


BLOCKED_COPY_HEADROOM = 2 * 1024**3  # left free after the blocked copy: activations, KV cache, decoding, the server


def _blocked_copy_fits(modules: Sequence[torch.nn.Module]) -> bool:
    """Whether a second, blocked copy of these modules' Linear weights fits in memory (with headroom)."""
    need = sum(
        m.weight.numel() * m.weight.element_size()
        for module in modules
        for m in module.modules()
        if type(m) is torch.nn.Linear
    )
    available = available_memory_bytes()
    if available is None or need + BLOCKED_COPY_HEADROOM <= available:
        return True
    log.warning(
        "batched CPU steps use chunked products: a blocked copy of the weights (%.1f GiB) does not fit in "
        "the %.1f GiB of memory available",
        need / 2**30,
        available / 2**30,
    )
    return False


def _use_skinny_linear(model: torch.nn.Module, blocked: bool) -> None:
    import types

    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = types.MethodType(_skinny_linear, module)  # type: ignore[method-assign]
            if blocked:
                bias = module.bias.detach().to_mkldnn() if module.bias is not None else None
                module._ting_blocked = (module.weight.detach().to_mkldnn(), bias)  # type: ignore[assignment]


# --- the KV cache ------------------------------------------------------------------------------------------


class SlotCache:
    """Keys and values of every running sequence: one row each, per layer.

    transformers' attention modules call `update(key, value, layer)` and attend over what it returns. In a
    prefill the new keys go into one row from position 0; in a decoding step each row gets one new key at its
    own position, and the step attends over the first `kv_len` positions of the first `rows` rows.
    """

    def __init__(
        self,
        layers: int,
        slots: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        max_len: int,
    ) -> None:
        self.shape = (slots, kv_heads, 0, head_dim)
        self.dtype, self.device, self.max_len = dtype, device, max_len
        self.keys = [self._empty(0) for _ in range(layers)]
        self.values = [self._empty(0) for _ in range(layers)]
        self._mode: tuple[Any, ...] = ("idle",)

    def _empty(self, length: int) -> torch.Tensor:
        slots, heads, _, dim = self.shape
        return torch.zeros(slots, heads, length, dim, dtype=self.dtype, device=self.device)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, length: int) -> None:
        if length <= self.capacity:
            return
        new = min(self.max_len, max(length, 2 * self.capacity, CACHE_GROWTH))
        new = min(self.max_len, -(-new // CACHE_GROWTH) * CACHE_GROWTH) if new < self.max_len else new
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = self._empty(new)
                grown[:, :, : old.shape[2]] = old
                store[i] = grown

    def begin_prefill(self, row: int, start: int = 0) -> None:
        """One prompt into `row` from position `start` (the positions before it hold a reused prefix)."""
        self._mode = ("prefill", row, start)

    def begin_batch_prefill(self, rows: torch.Tensor, starts: torch.Tensor | None = None, kv_len: int = 0) -> None:
        """Several prompts, right-padded, each into its row from its own start (None: all from 0); the pass attends
        over the first `kv_len` positions of those rows."""
        self._mode = ("batch", rows, starts, kv_len)

    def begin_step(self, rows: int, positions: torch.Tensor, kv_len: int) -> None:
        self._mode = ("step", rows, positions, kv_len, torch.arange(rows, device=self.device))

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self._mode[0] == "batch":  # several prompts, right-padded to one length, each into its own row
            _, rows, starts, kv_len = self._mode
            length = key.shape[2]
            if starts is None:
                k[rows, :, :length] = key
                v[rows, :, :length] = value
                return key, value
            positions = starts[:, None] + torch.arange(length, device=self.device)[None, :]
            k[rows[:, None], :, positions] = key.transpose(1, 2)
            v[rows[:, None], :, positions] = value.transpose(1, 2)
            return k[rows, :, :kv_len], v[rows, :, :kv_len]
        if self._mode[0] == "prefill":
            _, row, start = self._mode
            end = start + key.shape[2]
            k[row, :, start:end] = key[0]
            v[row, :, start:end] = value[0]
            return k[row : row + 1, :, :end], v[row : row + 1, :, :end]
        _, rows, positions, kv_len, index = self._mode
        k[index, :, positions] = key[:, :, 0]
        v[index, :, positions] = value[:, :, 0]
        return k[:rows, :, :kv_len], v[:rows, :, :kv_len]

    def move(self, src: int, dst: int, length: int) -> None:
        for store in (self.keys, self.values):
            for t in store:
                t[dst, :, :length] = t[src, :, :length]

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        for store in (self.keys, self.values):
            for t in store:
                held = t[a, :, :length_a].clone()
                t[a, :, :length_b] = t[b, :, :length_b]
                t[b, :, :length_a] = held


def audio_hashes(inputs: Any) -> tuple[bytes, ...]:
    """Per clip, a digest of what its audio tokens depend on: its mel frames up to the last one the encoder reads
    (ting.engine.wire sends the same frames), and their count. Equal digests, equal encoder output."""
    if not inputs:
        return ()
    features = np.asarray(inputs["input_features"])
    frames = np.asarray(inputs["feature_attention_mask"]).sum(-1).astype(int).tolist()
    return tuple(clip_digest(features[j], n) for j, n in enumerate(frames))


def clip_digest(features: np.ndarray, frames: int) -> bytes:
    """One clip's digest from its features (mel bins, at least every frame the encoder reads) and frame count."""
    kept = min(features.shape[-1], frames + FRAMES_READ_PAST_END)
    h = hashlib.blake2b(np.ascontiguousarray(features[:, :kept], dtype=np.float32).tobytes(), digest_size=16)
    h.update(int(frames).to_bytes(4, "little"))
    return h.digest()


# --- inputs: the processor's side (also run in the server process, before the engine) ----------------------


class LogMel:
    """WhisperFeatureExtractor's log-mel features (its torch path), without the work around them.

    The extractor pads each clip through BatchFeature and numpy, makes its Hann window and converts its mel
    filters on every call, then the processor converts everything to tensors again. This runs the same torch
    operations, in the same order, on the same shapes and dtypes (one batched STFT, |X|^2 of its frames but the
    last, the float32 mel product, log10, the per-clip floor at its maximum - 8 dB, the scaling), so the features
    are the extractor's bit for bit: tests/engine/test_prompt.py checks it against the processor's own output
    across clip lengths, silence and full-scale noise, whenever transformers changes.
    """

    def __init__(self, extractor: Any) -> None:
        self.n_fft: int = extractor.n_fft
        self.window = torch.hann_window(self.n_fft)
        self.filters = torch.from_numpy(extractor.mel_filters).to(torch.float32)

    @staticmethod
    def fits(extractor: Any) -> bool:
        """Whether `extractor` computes what this class reproduces (otherwise the processor runs, as it is)."""
        return (
            type(extractor).__name__ == "WhisperFeatureExtractor"
            and extractor.hop_length == HOP_SAMPLES
            and extractor.sampling_rate == SAMPLE_RATE
            and extractor.n_samples == WINDOW_SAMPLES
            and extractor.padding_value == 0.0
            and not extractor.dither
        )

    def __call__(self, samples: np.ndarray) -> tuple[np.ndarray, int]:
        """One clip's features (mel bins, its span's frames: features_span) and its frame count (the extractor's
        attention mask: a frame per hop begun, at most the window's).

        Each clip over its own span, not the batch's longest: the extractor's operations are per clip (the
        normalisation's maximum too), so a short clip beside a long one costs its own length."""
        span = features_span(len(samples))
        n = min(len(samples), span)
        batch = np.zeros((1, span), dtype=np.float32)
        batch[0, :n] = samples[:n]
        stft = torch.stft(torch.from_numpy(batch), self.n_fft, HOP_SAMPLES, window=self.window, return_complex=True)
        magnitudes = (stft[..., :-1].abs() ** 2).contiguous()
        log_spec = torch.clamp(self.filters.T @ magnitudes, min=1e-10).log10()
        floor = log_spec.max(dim=2, keepdim=True)[0].max(dim=1, keepdim=True)[0] - 8.0
        log_spec = (torch.maximum(log_spec, floor) + 4.0) / 4.0
        return log_spec.numpy()[0], -(-n // HOP_SAMPLES)


@dataclass(frozen=True)
class ClipFeatures:
    """One clip's log-mel features over its span, its frame count, and the digest that keys the prefix cache."""

    spectrum: np.ndarray  # (mel bins, frames of the clip's span: features_span)
    frames: int
    digest: bytes


class FeatureCache:
    """Clips' features by the identity of their samples array, least recently used first, bounded by bytes.

    Every chat turn resends the whole history, and the audio layer hands back the same decoded clip for the same
    bytes (audio/cache.py, scoped by the key's owner), so every turn extracted the same features again: ~25 ms
    of CPU for a 30 s clip, per clip, per turn. An entry is found only through the very array it was made from
    (a weak reference: never another key's clip, and an address reused by a new array is a miss), and only
    read-only arrays are kept (the decoder's are views of immutable bytes), so what an entry describes cannot
    change under it. Entries of arrays that are gone are dropped at the next insertion. Thread-safe."""

    def __init__(self, limit_bytes: int = FEATURE_CACHE_BYTES) -> None:
        self.limit_bytes = limit_bytes
        self.hits = 0
        self._entries: OrderedDict[int, tuple[weakref.ref[np.ndarray], ClipFeatures]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, samples: np.ndarray) -> ClipFeatures | None:
        with self._lock:
            entry = self._entries.get(id(samples))
            if entry is None or entry[0]() is not samples:
                return None
            self._entries.move_to_end(id(samples))
            self.hits += 1
            return entry[1]

    def put(self, samples: np.ndarray, features: ClipFeatures) -> None:
        size = features.spectrum.nbytes
        if samples.flags.writeable or size > self.limit_bytes:
            return
        ref = weakref.ref(samples)
        with self._lock:
            for key in [k for k, (r, _) in self._entries.items() if r() is None]:
                self._forget(key)
            self._forget(id(samples))
            while self._entries and self._bytes + size > self.limit_bytes:
                self._forget(next(iter(self._entries)))
            self._entries[id(samples)] = (ref, features)
            self._bytes += size

    def _forget(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1].spectrum.nbytes


class Qwen2AudioInputs:
    """Chat template, tokenizer and feature extractor: what turns messages into a Prompt. Needs no weights."""

    def __init__(self, processor: Any, feature_cache_bytes: int = FEATURE_CACHE_BYTES) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.audio_token_id: int = self.tokenizer.convert_tokens_to_ids(processor.audio_token)
        extractor = processor.feature_extractor
        self.log_mel = LogMel(extractor) if LogMel.fits(extractor) and self.tokenizer.is_fast else None
        self.features = FeatureCache(feature_cache_bytes)

    def prepare(self, messages: Sequence[Message]) -> Prompt:
        """Render the chat template, tokenize, extract log-mel features."""
        shaped, clips = template_messages(messages)
        _refuse_placeholders(shaped)
        text = self.processor.apply_chat_template(shaped, add_generation_prompt=True, tokenize=False)
        if self.log_mel is None:
            return self._through_processor(text, [c.samples for c in clips])
        if not clips:
            return Prompt(token_ids=self._tokenize(text), audio_tokens=(), inputs=None)
        features = [self._clip_features(self.log_mel, c.samples) for c in clips]
        audio_tokens = tuple(audio_tokens_for_frames(f.frames) for f in features)
        return Prompt(
            token_ids=self._expand_audio(self._tokenize(text), audio_tokens),
            audio_tokens=audio_tokens,
            inputs=_window_of(features),
            audio_hashes=tuple(f.digest for f in features),
        )

    def _clip_features(self, log_mel: LogMel, samples: np.ndarray) -> ClipFeatures:
        found = self.features.get(samples)
        if found is not None:
            return found
        spectrum, frames = log_mel(samples)
        spectrum.flags.writeable = False  # shared by every prompt that finds it in the cache
        made = ClipFeatures(spectrum, frames, clip_digest(spectrum, frames))
        self.features.put(samples, made)
        return made

    def _tokenize(self, text: str) -> tuple[int, ...]:
        """The processor's tokenizer call on one text (its fast tokenizer's own encoding, without the batching and
        tensor conversion around it)."""
        return tuple(self.tokenizer.backend_tokenizer.encode(text).ids)

    def _expand_audio(self, ids: tuple[int, ...], audio_tokens: Sequence[int]) -> tuple[int, ...]:
        """Each clip's one <|AUDIO|> id repeated to its token count, as the processor expands the text before
        tokenizing it (<|AUDIO|> is a special token: the text around it tokenizes the same either way)."""
        places = [i for i, t in enumerate(ids) if t == self.audio_token_id]
        if len(places) != len(audio_tokens):
            raise ValueError(f"{len(places)} audio placeholders in the prompt for {len(audio_tokens)} clips")
        out: list[int] = []
        start = 0
        for place, count in zip(places, audio_tokens, strict=True):
            out += ids[start:place]
            out += [self.audio_token_id] * count
            start = place + 1
        out += ids[start:]
        return tuple(out)

    def _through_processor(self, text: str, samples: list[np.ndarray]) -> Prompt:
        """The processor as it is (a checkpoint whose feature extractor LogMel does not reproduce)."""
        if samples:
            out = self.processor(
                text=text,
                audio=samples,
                sampling_rate=SAMPLE_RATE,
                audio_kwargs={"max_length": features_span(max(len(x) for x in samples))},
                return_tensors="pt",
            )
            frames = out["feature_attention_mask"].sum(-1).tolist()
            audio_tokens = tuple(audio_tokens_for_frames(f) for f in frames)
            inputs = _in_window(out["input_features"], out["feature_attention_mask"])
        else:
            out = self.processor(text=text, return_tensors="pt")
            audio_tokens, inputs = (), None
        ids = tuple(out["input_ids"][0].tolist())
        return Prompt(token_ids=ids, audio_tokens=audio_tokens, inputs=inputs, audio_hashes=audio_hashes(inputs))


def _refuse_placeholders(shaped: list[dict[str, Any]]) -> None:
    for message in shaped:
        content = message["content"]
        texts = [content] if isinstance(content, str) else [c.get("text", "") for c in content]
        if any(marker in t for t in texts for marker in AUDIO_MARKERS):
            raise InvalidParameter(
                f"The text may not contain the model's audio placeholder tokens ({', '.join(AUDIO_MARKERS)})."
            )


def _window_of(clips: Sequence[ClipFeatures]) -> dict[str, torch.Tensor]:
    """The clips' features in the 30 s window's 3000 frames, as the model's inputs are shaped (zeros past each
    clip's span: never read, masked and past what the encoder reads), and the extractor's mask (int32, 1 for each
    of a clip's frames)."""
    features = torch.zeros(len(clips), clips[0].spectrum.shape[0], WINDOW_FRAMES)
    window = features.numpy()
    for i, clip in enumerate(clips):
        window[i, :, : clip.spectrum.shape[-1]] = clip.spectrum
    frames = torch.tensor([clip.frames for clip in clips])
    mask = (torch.arange(WINDOW_FRAMES)[None, :] < frames[:, None]).to(torch.int32)
    return {"input_features": features, "feature_attention_mask": mask}


# Zero samples past a clip's end that make every mel frame the audio encoder reads equal to the window's own: the
# encoder reads a clip's frames and the next one (tokens of the model's own length function); the STFT's centred
# frames reach 200 samples (n_fft / 2) either side, and its reflection padding must see zeros as the window's does.
SPAN_MARGIN_SAMPLES = 5 * HOP_SAMPLES + 400
# At least this many frames: under 12 columns, the mel product (201 x 128 filters by the frames) takes another GEMM
# kernel whose sums round differently from the window's (a clip of 0.03 s differed in the last bit); a second of
# frames keeps every product on the path the 3000-frame window takes, at no measurable cost.
SPAN_MIN_SAMPLES = 100 * HOP_SAMPLES


def features_span(samples: int) -> int:
    """How many samples to extract a clip's log-mel features over: the clip and a margin, not the 30 s window.

    The feature extractor pads every clip to 30 s and runs its STFT over all of it: for a 2.6 s clip, 90% of the
    work (and the largest cost of the server process under load: bench/server.py with py-spy) goes to frames the
    encoder never reads. Over this span, the frames it reads are the same bit for bit (tests/engine/test_prompt.py
    checks it against the whole window), and the normalisation's maximum is the same (zeros give the floor)."""
    span = -(-(samples + SPAN_MARGIN_SAMPLES) // HOP_SAMPLES) * HOP_SAMPLES
    return min(WINDOW_SAMPLES, max(SPAN_MIN_SAMPLES, span))


def _in_window(features: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Features and mask over the 30 s window's 3000 frames, as the model's inputs are shaped; the frames past the
    span are zeros (never read: masked, and past what the encoder reads of each clip)."""
    missing = WINDOW_FRAMES - features.shape[-1]
    if missing > 0:
        features = torch.nn.functional.pad(features, (0, missing))
        mask = torch.nn.functional.pad(mask, (0, missing))
    return {"input_features": features, "feature_attention_mask": mask}


def limit_threads(threads: int) -> None:
    """Torch's intra-op threads in this process (the server process runs only the feature extractor)."""
    torch.set_num_threads(threads)


def use_threads(requested: int, backend: Any) -> int:
    """Set the engine's torch threads: `requested`, or (0) 1 for a model on a GPU and torch's default (every core)
    on the CPU. The number set.

    On a GPU the engine's CPU work is launching kernels, sampling and bookkeeping; a pool of intra-op threads only
    spins on the cores the server process and the audio decoders need. Measured with the tiny model as the
    stand-in for a GPU's step times (bench/server.py, 16 streams, 2 cores): 1 thread gave 1.45x the throughput of
    2 through HTTP."""
    device = getattr(backend, "device", None)
    threads = requested or (1 if getattr(device, "type", "cpu") != "cpu" else torch.get_num_threads())
    limit_threads(threads)
    return threads


def load_inputs(path: str | Path) -> Qwen2AudioInputs:
    """The processor of a checkpoint directory (no weights are read)."""
    try:
        return Qwen2AudioInputs(AutoProcessor.from_pretrained(path))
    except Exception as exc:
        raise ModelLoadError(f"Could not load the Qwen2-Audio processor from {path}: {exc}") from exc


# --- the backend ---------------------------------------------------------------------------------------------


@dataclass
class _Row:
    seq_id: int
    sampling: Sampling
    generator: torch.Generator
    salt: str = ""
    keys: list[Any] = field(default_factory=list)  # what each position of the row holds (_prompt_keys), then outputs
    cached: int = 0  # prompt tokens whose keys and values were reused, not prefilled


@dataclass
class _Entry:
    """A finished sequence's keys and values, held in a free slot for a later prompt that begins the same way."""

    salt: str
    keys: list[Any]  # per position held: the token id, or for an audio position its clip's digest
    used: int  # when it was last kept or reused (a clock): the least recent goes first


@dataclass
class _Start:
    """One prompt of a prefill: where it goes, and what of it is already in the cache."""

    seq_id: int
    prompt: Prompt
    sampling: Sampling
    keys: list[Any]
    source: int | None  # the row holding its longest cached prefix
    cached: int  # that prefix's length (0: none); at least the last prompt token is always prefilled
    row: int = -1


class Qwen2AudioBackend:
    def __init__(
        self,
        model: Qwen2AudioForConditionalGeneration,
        processor: Any,
        generation: GenerationConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_size: int,
        max_model_len: int,
        path: Path | None = None,
        cpu_blocked_weights: bool = True,
        batch_prefill: bool = True,
        prefix_caching: bool = True,
        prefix_cache_slots: int = 0,
        encoder_cache_bytes: int = ENCODER_CACHE_BYTES,
    ) -> None:
        self.model, self.processor = model, processor
        self.inputs = Qwen2AudioInputs(processor)
        self.batch_prefill = batch_prefill
        self.batched_prefills = 0  # prefills that took several prompts in one pass
        self.device, self.dtype, self.path = device, dtype, path
        self.tokenizer = processor.tokenizer
        text: Any = model.config.text_config
        self.max_model_len = min(max_model_len, text.max_position_embeddings)
        self.audio_token_id = model.config.audio_token_id
        self.pad_token_id = generation.pad_token_id if generation.pad_token_id is not None else 0
        self.vocab_size = text.vocab_size
        eos = generation.eos_token_id if generation.eos_token_id is not None else text.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos or [])
        self.defaults = Defaults(
            temperature=float(generation.temperature or 1.0) if generation.do_sample else 0.0,
            top_p=float(generation.top_p if generation.top_p is not None else 1.0),
            top_k=int(generation.top_k or 0),
            repetition_penalty=float(generation.repetition_penalty or 1.0),
        )
        self.lm = model.model.language_model
        if device.type == "cpu":
            blocked = (
                dtype == torch.float32
                and torch.backends.mkldnn.is_available()
                and cpu_blocked_weights
                and _blocked_copy_fits([self.lm, model.lm_head])
            )
            _use_skinny_linear(self.lm, blocked)
            _use_skinny_linear(model.lm_head, blocked)
        self.embed = self.lm.get_input_embeddings()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.kv_rows = max_batch_size + (prefix_cache_slots if prefix_caching else 0)  # running + kept only
        self.cache = SlotCache(
            text.num_hidden_layers,
            self.kv_rows,
            text.num_key_value_heads,
            head_dim,
            dtype=dtype,
            device=device,
            max_len=self.max_model_len,
        )
        self.slots = max_batch_size
        self._rows: list[_Row] = []  # row i of every per-row tensor belongs to self._rows[i]
        self._row_of: dict[int, int] = {}
        self._lengths = torch.zeros(max_batch_size, dtype=torch.long, device=device)  # tokens in the cache
        self._last = torch.zeros(max_batch_size, dtype=torch.long, device=device)  # token to feed next
        self._seen = torch.zeros(max_batch_size, self.vocab_size, dtype=torch.bool, device=device)
        self._counts = torch.zeros(max_batch_size, self.vocab_size, dtype=torch.int32, device=device)
        # The prefix cache: finished sequences' keys and values, left in the free slots they held.
        self.prefix_caching = prefix_caching
        self._entries: dict[int, _Entry] = {}  # free row -> what it holds
        self._clock = itertools.count()
        self._prefix_hits = self._prefix_cached_tokens = 0
        # Audio-encoder outputs by clip digest, least recently used first, bounded by their size.
        self.encoder_cache_bytes = encoder_cache_bytes
        self._encoder_cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._encoder_bytes = self._encoder_hits = 0

    # --- Backend protocol ---

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "prefix_caching": self.prefix_caching,
            "kv_cache_slots": self.kv_rows,
        }

    def prepare(self, messages: Sequence[Message]) -> Prompt:
        return self.inputs.prepare(messages)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def prefill(self, items: Sequence[tuple[int, Prompt, Sampling]]) -> Iterator[tuple[int, int]]:
        """Start sequences; yields (sequence id, first token) as each prompt is done, so its first token can go
        out before the next prompt is prefilled. A prompt that begins with keys and values still held from an
        earlier sequence of the same salt takes them and prefills only the rest. The audio encoder runs once,
        batched across all the clips not already in its cache."""
        if len(self._rows) + len(items) > self.slots:
            raise RuntimeError("no free KV-cache slot")
        with torch.inference_mode():
            plan = self._plan(items)
            audio = self._encode_audio(plan)
        if len(plan) > 1 and self.batch_prefill:
            self.batched_prefills += 1
            with torch.inference_mode():
                tokens = self._prefill_batch(plan, audio)
            yield from zip((s.seq_id for s in plan), tokens, strict=True)
            return
        for start, clips in zip(plan, audio, strict=True):
            with torch.inference_mode():
                token = self._prefill_one(start, clips)
            yield start.seq_id, token

    def _prefill_batch(self, plan: Sequence[_Start], audio: list[list[torch.Tensor | None]]) -> list[int]:
        """Several prompts in one forward pass: right-padded, a causal mask that also hides the padding.

        Larger matrix products than one prompt at a time (on CPU about a quarter faster per token), at the cost of
        their first tokens going out together. A lone prompt takes _prefill_one, the pass `generate()` makes. A
        prompt with a cached prefix feeds only its suffix, at its own positions, attending over its row's prefix.
        """
        n = len(plan)
        starts = torch.tensor([s.cached for s in plan], device=self.device)
        totals = torch.tensor([len(s.prompt.token_ids) for s in plan], device=self.device)
        lengths = totals - starts  # tokens fed per prompt
        width = int(lengths.max())
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long, device=self.device)
        for i, s in enumerate(plan):
            ids[i, : int(lengths[i])] = torch.tensor(s.prompt.token_ids[s.cached :], device=self.device)
        embeds = self.embed(ids)
        for i, s in enumerate(plan):
            self._scatter_audio(embeds[i], s, audio[i])
        rows = torch.tensor([s.row for s in plan], device=self.device)
        offsets = torch.arange(width, device=self.device)
        positions = starts[:, None] + offsets[None, :]
        if any(s.cached for s in plan):
            kv_len = int((starts + width).max())
            keys = torch.arange(kv_len, device=self.device)
            visible = (keys[None, None, :] <= positions[:, :, None]) & (keys[None, None, :] < totals[:, None, None])
            visible = visible[:, None]
            self.cache.reserve(kv_len + 1)
            self.cache.begin_batch_prefill(rows, starts, kv_len)
        else:
            causal = offsets[None, :] <= offsets[:, None]
            visible = causal[None, None] & (offsets[None, :] < lengths[:, None])[:, None, None, :]
            self.cache.reserve(width + 1)
            self.cache.begin_batch_prefill(rows)
        hidden = self.lm(
            inputs_embeds=embeds,
            attention_mask={"full_attention": visible},
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        ).last_hidden_state
        last = hidden[torch.arange(n, device=self.device), lengths - 1]
        _Decoding.active = True
        try:
            logits = self.model.lm_head(last)
        finally:
            _Decoding.active = False
        for s in plan:
            self._start_row(s)
        return self._sample(logits, rows.tolist())

    def _prefill_one(self, s: _Start, clips: list[torch.Tensor | None]) -> int:
        """One prompt by itself: without a cached prefix, the pass `generate()` makes."""
        total = len(s.prompt.token_ids)
        embeds = self.embed(torch.tensor([s.prompt.token_ids[s.cached :]], device=self.device))
        self._scatter_audio(embeds[0], s, clips)
        positions = torch.arange(s.cached, total, device=self.device)
        mask = None  # from position 0: the causal mask transformers makes, as generate() does
        if s.cached:  # the suffix sees the whole prefix and itself causally
            mask = (torch.arange(total, device=self.device)[None, :] <= positions[:, None])[None, None]
        self.cache.reserve(total + 1)
        self.cache.begin_prefill(s.row, s.cached)
        hidden = self.lm(
            inputs_embeds=embeds,
            attention_mask={"full_attention": mask},
            position_ids=positions[None],
            past_key_values=self.cache,
            use_cache=True,
        ).last_hidden_state
        logits = self.model.lm_head(hidden[:, -1])
        self._start_row(s)
        return self._sample(logits, [s.row])[0]

    @torch.inference_mode()
    def step(self) -> Mapping[int, int]:
        n = len(self._rows)
        if n == 0:
            return {}
        positions = self._lengths[:n]
        kv_len = int(positions.max()) + 1
        self.cache.reserve(kv_len)
        ragged = bool((positions != positions[0]).any())
        mask = (
            (torch.arange(kv_len, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]
            if ragged
            else None
        )
        self.cache.begin_step(n, positions, kv_len)
        _Decoding.active = n > 1
        try:
            hidden = self.lm(
                inputs_embeds=self.embed(self._last[:n, None]),
                attention_mask={"full_attention": mask},
                position_ids=positions[:, None],
                past_key_values=self.cache,
                use_cache=True,
            ).last_hidden_state
            logits = self.model.lm_head(hidden[:, -1])
        finally:
            _Decoding.active = False
        self._lengths[:n] += 1
        tokens = self._sample(logits, list(range(n)))
        return {self._rows[r].seq_id: t for r, t in enumerate(tokens)}

    @torch.inference_mode()
    def release(self, seq_id: int) -> None:
        """Free the sequence's slot. With prefix caching its keys and values stay there, an entry a later prompt
        of the same salt may reuse, until the slot is needed."""
        row = self._row_of.pop(seq_id, None)
        if row is None:
            return
        last = len(self._rows) - 1
        done = self._rows[row]
        length = int(self._lengths[row])
        keep = self.prefix_caching and 0 < length <= len(done.keys)
        if row != last:  # keep rows contiguous: the last row moves into the freed one (and this one to the last)
            if keep:
                self.cache.swap(row, last, length, int(self._lengths[last]))
            else:
                self.cache.move(last, row, int(self._lengths[last]))
            for t in (self._lengths, self._last, self._seen, self._counts):
                t[row] = t[last]
            self._rows[row] = self._rows[last]
            self._row_of[self._rows[row].seq_id] = row
        self._rows.pop()
        if keep:
            self._entries[last] = _Entry(done.salt, done.keys[:length], next(self._clock))

    def clear_caches(self) -> None:
        """Forget every prefix entry and encoder output (benchmarks compare runs with and without them)."""
        self._entries.clear()
        self._encoder_cache.clear()
        self._encoder_bytes = 0

    def cached_tokens(self, seq_id: int) -> int:
        """Prompt tokens of a running sequence that were reused from the cache rather than prefilled."""
        row = self._row_of.get(seq_id)
        return self._rows[row].cached if row is not None else 0

    def cache_stats(self) -> CacheStats:
        return CacheStats(
            prefix_hits=self._prefix_hits,
            prefix_cached_tokens=self._prefix_cached_tokens,
            prefix_entries=len(self._entries),
            encoder_hits=self._encoder_hits,
            encoder_entries=len(self._encoder_cache),
            encoder_bytes=self._encoder_bytes,
        )

    # --- internals ---

    def _start_row(self, s: _Start) -> None:
        row = len(self._rows)
        assert s.row == row, "prompts start in row order"
        generator = torch.Generator(device="cpu")
        generator.manual_seed(s.sampling.seed)
        keys = s.keys if self.prefix_caching else []
        self._rows.append(_Row(s.seq_id, s.sampling, generator, s.prompt.cache_salt, keys, s.cached))
        self._row_of[s.seq_id] = row
        self._lengths[row] = len(s.prompt.token_ids)
        self._seen[row] = False
        self._seen[row, torch.tensor(s.prompt.token_ids, device=self.device)] = True
        self._counts[row] = 0

    # --- the prefix cache ---

    def _plan(self, items: Sequence[tuple[int, Prompt, Sampling]]) -> list[_Start]:
        """Rows for the prompts, and their cached prefixes put in place, before any forward pass.

        The prompts take the next free rows. A prompt that extends a whole entry held in one of those rows takes
        that row (a follow-up: nothing to copy, and the entry lives on inside the new sequence), and so does one
        sharing only part of it when there is no free row left to move the entry to. Other entries in the rows
        taken move further out, or are evicted, the least recently used first; a prompt that shares part of an
        entry elsewhere gets that part copied into its own row, and the entry stays.
        """
        first = len(self._rows)
        targets = range(first, first + len(items))
        plan = []
        for seq_id, prompt, sampling in items:
            keys = self._prompt_keys(prompt)
            source, cached = self._lookup(prompt.cache_salt, keys)
            plan.append(_Start(seq_id, prompt, sampling, keys, source, cached))
        room = any(r not in self._entries for r in range(targets.stop, self.kv_rows))  # to move an entry out to
        taken: dict[int, _Start] = {}
        for s in plan:
            if (
                s.source is not None
                and s.source in targets
                and s.source not in taken
                and (s.cached == len(self._entries[s.source].keys) or not room)
            ):
                taken[s.source] = s
                s.row = s.source
        free = iter([r for r in targets if r not in taken])
        for s in plan:
            if s.row < 0:
                s.row = next(free)
        needed = {s.source for s in plan if s.source is not None}
        moved = {
            row: self._relocate(row, beyond=targets.stop, keep=needed)
            for row in targets
            if row in self._entries and row not in taken
        }
        for s in plan:
            if s.source in moved:
                s.source = moved[s.source]
                if s.source is None:  # evicted: no room to keep it beyond the rows taken
                    s.cached = 0
            if s.source is None:
                continue
            self._prefix_hits += 1
            self._prefix_cached_tokens += s.cached
            if s.source != s.row:
                self.cache.move(s.source, s.row, s.cached)
            if s.source in self._entries:
                self._entries[s.source].used = next(self._clock)
        for row in taken:  # written past the prefix now: the new sequence holds it
            del self._entries[row]
        return sorted(plan, key=lambda s: s.row)

    def _lookup(self, salt: str, keys: list[Any]) -> tuple[int | None, int]:
        """The entry of this salt sharing the longest prefix with `keys`, and that length (short of the last
        prompt token, whose logits give the first new token)."""
        if not self.prefix_caching:
            return None, 0
        best_row, best = None, 0
        limit = len(keys) - 1
        for row, entry in self._entries.items():
            if entry.salt != salt:
                continue
            n = _common_prefix(entry.keys, keys, limit)
            if n > best:
                best_row, best = row, n
        return best_row, best

    def _relocate(self, row: int, *, beyond: int, keep: set[int]) -> int | None:
        """Move the entry out of `row` (about to be taken) to a spare row past `beyond`, or in place of the least
        recently used entry there (never one in `keep`) if that one is older; otherwise evict it. Its new row, or
        None."""
        entry = self._entries.pop(row)
        spare = [r for r in range(beyond, self.kv_rows) if r not in self._entries]
        if spare:
            dest = spare[0]
        else:
            victims = [r for r in range(beyond, self.kv_rows) if r not in keep]
            if not victims:
                return None
            dest = min(victims, key=lambda r: self._entries[r].used)
            if self._entries[dest].used > entry.used and row not in keep:
                return None
            del self._entries[dest]
        self.cache.move(row, dest, len(entry.keys))
        self._entries[dest] = entry
        if row in keep:
            keep.add(dest)
        return dest

    def _prompt_keys(self, prompt: Prompt) -> list[Any]:
        """What each position holds: its token id, or for an audio position its clip's digest (two prompts with
        equal token ids but different audio must not share keys and values)."""
        keys: list[Any] = list(prompt.token_ids)
        if not self.prefix_caching:
            return keys
        for (start, count), digest in zip(self._clip_spans(prompt), self._digests(prompt), strict=True):
            keys[start : start + count] = [digest] * count
        return keys

    def _clip_spans(self, prompt: Prompt) -> list[tuple[int, int]]:
        """(first position, token count) of each clip's audio tokens in the prompt."""
        if not prompt.audio_tokens:
            return []
        positions = np.flatnonzero(np.asarray(prompt.token_ids) == self.audio_token_id)
        firsts = np.cumsum((0, *prompt.audio_tokens[:-1]))
        return [(int(positions[f]), n) for f, n in zip(firsts, prompt.audio_tokens, strict=True)]

    def _digests(self, prompt: Prompt) -> tuple[bytes, ...]:
        if len(prompt.audio_hashes) == len(prompt.audio_tokens):
            return prompt.audio_hashes
        return audio_hashes(prompt.inputs)

    def _scatter_audio(self, embeds: torch.Tensor, s: _Start, clips: list[torch.Tensor | None]) -> None:
        """Put each clip's encoder output at its audio positions in `embeds` (the positions from s.cached on)."""
        for (first, count), out in zip(self._clip_spans(s.prompt), clips, strict=True):
            lo = max(first, s.cached)
            if first + count <= lo:
                continue
            assert out is not None
            embeds[lo - s.cached : first + count - s.cached] = out[lo - first :].to(embeds.dtype)

    # --- the audio encoder ---

    def _encode_audio(self, plan: Sequence[_Start]) -> list[list[torch.Tensor | None]]:
        """Encoder output per clip of each prompt (None for a clip wholly inside a cached prefix). Clips in the
        encoder cache are not encoded again; the rest are encoded together, batched by length."""
        found: dict[bytes, torch.Tensor] = {}
        todo: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}  # digest -> (features, mask) of one clip
        wanted: list[list[bytes | None]] = []
        for s in plan:
            digests: list[bytes | None] = []
            spans, hashes = self._clip_spans(s.prompt), self._digests(s.prompt)
            for j, ((first, count), digest) in enumerate(zip(spans, hashes, strict=True)):
                if first + count <= s.cached:
                    digests.append(None)
                    continue
                digests.append(digest)
                if digest in found or digest in todo:
                    continue
                hit = self._encoder_cache.get(digest)
                if hit is not None:
                    self._encoder_cache.move_to_end(digest)
                    self._encoder_hits += 1
                    found[digest] = hit
                else:
                    # (numpy arrays when the prompt came from the server process: ting.engine.wire)
                    features = torch.as_tensor(s.prompt.inputs["input_features"][j : j + 1])
                    mask = torch.as_tensor(s.prompt.inputs["feature_attention_mask"][j : j + 1])
                    todo[digest] = (features, mask)
            wanted.append(digests)
        if todo:
            order = list(todo)
            features = torch.cat([todo[d][0] for d in order])
            frames = torch.cat([todo[d][1] for d in order]).sum(-1)
            by_length = sorted(range(len(order)), key=lambda j: int(frames[j]))  # similar lengths share a batch
            for start in range(0, len(by_length), ENCODER_BATCH):
                chunk = by_length[start : start + ENCODER_BATCH]
                embeds = self._encode_clips(features[chunk].to(self.device, self.dtype), frames[chunk].to(self.device))
                for j, out in zip(chunk, embeds, strict=True):
                    found[order[j]] = out
                    self._remember_encoding(order[j], out)
        return [[found[d] if d is not None else None for d in digests] for digests in wanted]

    def _remember_encoding(self, digest: bytes, out: torch.Tensor) -> None:
        size = out.numel() * out.element_size()
        if size > self.encoder_cache_bytes:
            return
        self._encoder_cache[digest] = out.clone()  # (a view would hold its whole batch)
        self._encoder_bytes += size
        while self._encoder_bytes > self.encoder_cache_bytes:
            _, old = self._encoder_cache.popitem(last=False)
            self._encoder_bytes -= old.numel() * old.element_size()

    def _encode_clips(self, features: torch.Tensor, frames: torch.Tensor) -> list[torch.Tensor]:
        """transformers' Qwen2AudioEncoder.forward, run over the clips' own frames instead of the whole window.

        The reference always encodes 3000 mel frames (30 s), masking the padding out of attention. Each
        convolution looks one frame ahead, so positions up to a clip's end depend only on its frames and the
        one after; encoding just those gives the same features for every position the model uses, and a 5 s
        clip costs a sixth of the work. A full 30 s window is exactly the reference pass.
        """
        tower, projector = self.model.model.audio_tower, self.model.model.multi_modal_projector
        after_conv, tokens = tower._get_feat_extract_output_lengths(frames)
        width = min(features.shape[-1], 2 * int(after_conv.max()) + 1)
        hidden = torch.nn.functional.gelu(tower.conv1(features[..., :width]))
        hidden = torch.nn.functional.gelu(tower.conv2(hidden)).permute(0, 2, 1)
        positions = hidden.shape[1]
        hidden = hidden + tower.embed_positions.weight[:positions]
        valid = (torch.arange(positions, device=self.device)[None, :] < after_conv[:, None]).long()
        mask = create_bidirectional_mask(
            config=tower.config,
            attention_mask=valid,
            inputs_embeds=torch.zeros(len(features), positions, 1, dtype=self.dtype, device=self.device),
        )
        for layer in tower.layers:
            hidden = layer(hidden, mask)
        hidden = tower.avg_pooler(hidden.permute(0, 2, 1)).permute(0, 2, 1)
        out = projector(tower.layer_norm(hidden))
        return [out[j, : int(tokens[j])] for j in range(len(features))]

    def _sample(self, logits: torch.Tensor, rows: list[int]) -> list[int]:
        """Next token per row: penalties, then greedy or temperature / top-k / top-p sampling (as transformers)."""
        logits = logits.float()
        params = [self._rows[r].sampling for r in rows]
        index = torch.tensor(rows, device=self.device)
        penalty = torch.tensor([p.repetition_penalty for p in params], device=self.device)[:, None]
        if bool((penalty != 1.0).any()):
            penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
            logits = torch.where(self._seen[index], penalised, logits)
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            counts = self._counts[index].float()
            presence = torch.tensor([p.presence_penalty for p in params], device=self.device)[:, None]
            frequency = torch.tensor([p.frequency_penalty for p in params], device=self.device)[:, None]
            logits = logits - presence * (counts > 0) - frequency * counts
        chosen = logits.argmax(-1)
        sampled = [i for i, p in enumerate(params) if p.temperature > 0]
        if sampled:
            chosen[sampled] = self._draw(logits[sampled], [rows[i] for i in sampled])
        self._seen[index, chosen] = True
        self._counts[index, chosen] += 1
        self._last[index] = chosen
        tokens: list[int] = chosen.tolist()
        if self.prefix_caching:
            for r, t in zip(rows, tokens, strict=True):
                self._rows[r].keys.append(t)
        return tokens

    def _draw(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        params = [self._rows[r].sampling for r in rows]
        vocab = logits.shape[-1]
        temperature = torch.tensor([p.temperature for p in params], device=self.device)[:, None]
        logits = logits / temperature
        ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        width = max(ks)
        if width < vocab:
            values, ids = logits.topk(width, dim=-1)
        else:
            values, ids = logits.sort(dim=-1, descending=True)
        beyond_k = torch.arange(width, device=self.device)[None, :] >= torch.tensor(ks, device=self.device)[:, None]
        probs = values.masked_fill(beyond_k, float("-inf")).softmax(-1)
        top_p = torch.tensor([p.top_p for p in params], device=self.device)[:, None]
        before = probs.cumsum(-1) - probs  # probability mass ranked above each candidate
        outside = before >= top_p
        outside[:, 0] = False
        probs = probs.masked_fill(outside, 0.0)
        cumulative = probs.cumsum(-1)
        draws = torch.tensor(
            [torch.rand((), generator=self._rows[r].generator).item() for r in rows], device=self.device
        )[:, None]
        pick = (cumulative < draws * cumulative[:, -1:]).sum(-1).clamp(max=width - 1)
        return ids.gather(1, pick[:, None]).squeeze(1)


def _common_prefix(a: list[Any], b: list[Any], limit: int) -> int:
    """How many leading elements `a` and `b` share, at most `limit`."""
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
