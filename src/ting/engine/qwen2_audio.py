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

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoProcessor, GenerationConfig, Qwen2AudioForConditionalGeneration
from transformers.masking_utils import create_bidirectional_mask

from ting.engine.backend import Defaults, Prompt, Sampling
from ting.engine.prompt import template_messages
from ting.errors import InvalidParameter, ModelLoadError
from ting.types import SAMPLE_RATE, Message, audio_tokens_for_frames

log = logging.getLogger("ting.engine")

ENCODER_BATCH = 8  # clips per audio-encoder call (a 30 s window each)
SKINNY_CHUNK = 1024  # weight rows per product in a batched CPU decoding step
CACHE_GROWTH = 256  # KV-cache length grows in steps of this many tokens
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

    def begin_prefill(self, row: int) -> None:
        self._mode = ("prefill", row)

    def begin_batch_prefill(self, rows: torch.Tensor) -> None:
        self._mode = ("batch", rows)

    def begin_step(self, rows: int, positions: torch.Tensor, kv_len: int) -> None:
        self._mode = ("step", rows, positions, kv_len, torch.arange(rows, device=self.device))

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self._mode[0] == "batch":  # several prompts, right-padded to one length, each into its own row
            rows, length = self._mode[1], key.shape[2]
            k[rows, :, :length] = key
            v[rows, :, :length] = value
            return key, value
        if self._mode[0] == "prefill":
            row, length = self._mode[1], key.shape[2]
            k[row, :, :length] = key[0]
            v[row, :, :length] = value[0]
            return k[row : row + 1, :, :length], v[row : row + 1, :, :length]
        _, rows, positions, kv_len, index = self._mode
        k[index, :, positions] = key[:, :, 0]
        v[index, :, positions] = value[:, :, 0]
        return k[:rows, :, :kv_len], v[:rows, :, :kv_len]

    def move(self, src: int, dst: int, length: int) -> None:
        for store in (self.keys, self.values):
            for t in store:
                t[dst, :, :length] = t[src, :, :length]


# --- inputs: the processor's side (also run in the server process, before the engine) ----------------------


class Qwen2AudioInputs:
    """Chat template, tokenizer and feature extractor: what turns messages into a Prompt. Needs no weights."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def prepare(self, messages: Sequence[Message]) -> Prompt:
        """Render the chat template, tokenize, extract log-mel features."""
        shaped, clips = template_messages(messages)
        for message in shaped:
            texts = (
                [message["content"]]
                if isinstance(message["content"], str)
                else [c.get("text", "") for c in message["content"]]
            )
            if any(marker in t for t in texts for marker in AUDIO_MARKERS):
                raise InvalidParameter(
                    f"The text may not contain the model's audio placeholder tokens ({', '.join(AUDIO_MARKERS)})."
                )
        text = self.processor.apply_chat_template(shaped, add_generation_prompt=True, tokenize=False)
        if clips:
            samples = [c.samples for c in clips]
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
        return Prompt(token_ids=ids, audio_tokens=audio_tokens, inputs=inputs)


WINDOW_SAMPLES = 30 * SAMPLE_RATE  # the feature extractor's window: 3000 mel frames
HOP_SAMPLES = 160
# Zero samples past a clip's end that make every mel frame the audio encoder reads equal to the window's own: the
# encoder reads a clip's frames and the next one (tokens of the model's own length function); the STFT's centred
# frames reach 200 samples (n_fft / 2) either side, and its reflection padding must see zeros as the window's does.
SPAN_MARGIN_SAMPLES = 5 * HOP_SAMPLES + 400


def features_span(longest_samples: int) -> int:
    """How many samples to extract log-mel features over: the longest clip and a margin, not the 30 s window.

    The feature extractor pads every clip to 30 s and runs its STFT over all of it: for a 2.6 s clip, 90% of the
    work (and the largest cost of the server process under load: bench/server.py with py-spy) goes to frames the
    encoder never reads. Over this span, the frames it reads are the same bit for bit (tests/engine/test_prompt.py
    checks it against the whole window), and the normalisation's maximum is the same (zeros give the floor)."""
    span = -(-(longest_samples + SPAN_MARGIN_SAMPLES) // HOP_SAMPLES) * HOP_SAMPLES
    return min(WINDOW_SAMPLES, span)


def _in_window(features: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Features and mask over the 30 s window's 3000 frames, as the model's inputs are shaped; the frames past the
    span are zeros (never read: masked, and past what the encoder reads of each clip)."""
    window = WINDOW_SAMPLES // HOP_SAMPLES
    missing = window - features.shape[-1]
    if missing > 0:
        features = torch.nn.functional.pad(features, (0, missing))
        mask = torch.nn.functional.pad(mask, (0, missing))
    return {"input_features": features, "feature_attention_mask": mask}


def limit_threads(threads: int) -> None:
    """Torch's intra-op threads in this process (the server process runs only the feature extractor)."""
    torch.set_num_threads(threads)


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
        self.cache = SlotCache(
            text.num_hidden_layers,
            max_batch_size,
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

    # --- Backend protocol ---

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }

    def prepare(self, messages: Sequence[Message]) -> Prompt:
        return self.inputs.prepare(messages)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def prefill(self, items: Sequence[tuple[int, Prompt, Sampling]]) -> Iterator[tuple[int, int]]:
        """Start sequences; yields (sequence id, first token) as each prompt is done, so its first token can go
        out before the next prompt is prefilled. The audio encoder runs once, batched across all of them."""
        if len(self._rows) + len(items) > self.slots:
            raise RuntimeError("no free KV-cache slot")
        with torch.inference_mode():
            audio = self._encode_audio([prompt for _, prompt, _ in items])
        if len(items) > 1 and self.batch_prefill:
            self.batched_prefills += 1
            with torch.inference_mode():
                tokens = self._prefill_batch(items, audio)
            yield from zip((seq_id for seq_id, _, _ in items), tokens, strict=True)
            return
        for (seq_id, prompt, sampling), features in zip(items, audio, strict=True):
            with torch.inference_mode():
                token = self._prefill_one(seq_id, prompt, sampling, features)
            yield seq_id, token

    def _prefill_batch(
        self, items: Sequence[tuple[int, Prompt, Sampling]], audio: list[torch.Tensor | None]
    ) -> list[int]:
        """Several prompts in one forward pass: right-padded, a causal mask that also hides the padding.

        Larger matrix products than one prompt at a time (on CPU about a quarter faster per token), at the cost of
        their first tokens going out together. A lone prompt takes _prefill_one, the pass `generate()` makes.
        """
        lengths = torch.tensor([len(p.token_ids) for _, p, _ in items], device=self.device)
        width = int(lengths.max())
        ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long, device=self.device)
        for i, (_, prompt, _) in enumerate(items):
            ids[i, : len(prompt.token_ids)] = torch.tensor(prompt.token_ids, device=self.device)
        embeds = self.embed(ids)
        for i, features in enumerate(audio):
            if features is not None:
                mask = (ids[i] == self.audio_token_id).unsqueeze(-1)
                embeds[i] = embeds[i].masked_scatter(mask, features.to(embeds.dtype))
        first_row = len(self._rows)
        rows = torch.arange(first_row, first_row + len(items), device=self.device)
        positions = torch.arange(width, device=self.device)
        causal = positions[None, :] <= positions[:, None]
        visible = causal[None, None] & (positions[None, :] < lengths[:, None])[:, None, None, :]
        self.cache.reserve(width + 1)
        self.cache.begin_batch_prefill(rows)
        hidden = self.lm(
            inputs_embeds=embeds,
            attention_mask={"full_attention": visible},
            position_ids=positions[None].expand(len(items), width),
            past_key_values=self.cache,
            use_cache=True,
        ).last_hidden_state
        last = hidden[torch.arange(len(items), device=self.device), lengths - 1]
        _Decoding.active = True
        try:
            logits = self.model.lm_head(last)
        finally:
            _Decoding.active = False
        for i, (seq_id, prompt, sampling) in enumerate(items):
            self._start_row(first_row + i, seq_id, prompt, sampling)
        return self._sample(logits, rows.tolist())

    def _prefill_one(self, seq_id: int, prompt: Prompt, sampling: Sampling, features: torch.Tensor | None) -> int:
        row = len(self._rows)
        ids = torch.tensor([prompt.token_ids], device=self.device)
        embeds = self.embed(ids)
        if features is not None:
            mask = (ids == self.audio_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
        length = ids.shape[1]
        self.cache.reserve(length + 1)
        self.cache.begin_prefill(row)
        hidden = self.lm(
            inputs_embeds=embeds,
            attention_mask={"full_attention": None},
            position_ids=torch.arange(length, device=self.device)[None],
            past_key_values=self.cache,
            use_cache=True,
        ).last_hidden_state
        logits = self.model.lm_head(hidden[:, -1])
        self._start_row(row, seq_id, prompt, sampling)
        return self._sample(logits, [row])[0]

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
        row = self._row_of.pop(seq_id, None)
        if row is None:
            return
        last = len(self._rows) - 1
        if row != last:  # keep rows contiguous: the last row moves into the freed one
            self.cache.move(last, row, int(self._lengths[last]))
            for t in (self._lengths, self._last, self._seen, self._counts):
                t[row] = t[last]
            self._rows[row] = self._rows[last]
            self._row_of[self._rows[row].seq_id] = row
        self._rows.pop()

    # --- internals ---

    def _start_row(self, row: int, seq_id: int, prompt: Prompt, sampling: Sampling) -> None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(sampling.seed)
        self._rows.append(_Row(seq_id, sampling, generator))
        self._row_of[seq_id] = row
        self._lengths[row] = len(prompt.token_ids)
        self._seen[row] = False
        self._seen[row, torch.tensor(prompt.token_ids, device=self.device)] = True
        self._counts[row] = 0

    def _encode_audio(self, prompts: Sequence[Prompt]) -> list[torch.Tensor | None]:
        """Audio embeddings per prompt (all its clips, in order), the encoder batched across prompts."""
        owners = [i for i, p in enumerate(prompts) for _ in p.audio_tokens]
        if not owners:
            return [None] * len(prompts)
        # (numpy arrays when the prompt came from the server process: ting.engine.wire)
        features = torch.cat([torch.as_tensor(p.inputs["input_features"]) for p in prompts if p.audio_tokens])
        frames = torch.cat(
            [torch.as_tensor(p.inputs["feature_attention_mask"]) for p in prompts if p.audio_tokens]
        ).sum(-1)
        order = sorted(range(len(features)), key=lambda j: int(frames[j]))  # similar lengths share a batch
        per_clip: dict[int, torch.Tensor] = {}
        for start in range(0, len(order), ENCODER_BATCH):
            chunk = order[start : start + ENCODER_BATCH]
            embeds = self._encode_clips(features[chunk].to(self.device, self.dtype), frames[chunk].to(self.device))
            per_clip.update(zip(chunk, embeds, strict=True))
        grouped: list[list[torch.Tensor]] = [[] for _ in prompts]
        for j, owner in enumerate(owners):
            grouped[owner].append(per_clip[j])
        return [torch.cat(g) if g else None for g in grouped]

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
        return chosen.tolist()

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
