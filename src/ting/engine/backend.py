"""The seam between the scheduler and the model.

The scheduler (pure Python, no torch) decides who runs; a Backend owns the weights, the KV cache and the
sampling, and does one batched step at a time. `Qwen2AudioBackend` (qwen2_audio.py) is the real one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ting.types import Message


@dataclass(frozen=True, eq=False)
class Prompt:
    """A tokenized prompt with its audio features, ready for prefill."""

    token_ids: tuple[int, ...]  # the whole prompt, each clip's <|AUDIO|> expanded to its token count
    audio_tokens: tuple[int, ...]  # audio tokens the model sees, per clip
    inputs: Any  # backend-specific tensors (mel features and masks)
    audio_hashes: tuple[bytes, ...] = ()  # per clip, a digest of the features its audio tokens depend on
    cache_salt: str = ""  # whose request: cached keys and values are reused only between equal salts

    @property
    def text_tokens(self) -> int:
        """Prompt tokens that are not audio: the text and the chat template."""
        return len(self.token_ids) - sum(self.audio_tokens)


@dataclass(frozen=True)
class Sampling:
    """SamplingParams with every default resolved against the checkpoint's generation config."""

    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float  # 1.0: off
    top_k: int  # 0: off
    repetition_penalty: float  # 1.0: off
    presence_penalty: float
    frequency_penalty: float
    seed: int
    stop: tuple[str, ...]
    stop_token_ids: frozenset[int]
    ignore_eos: bool


@dataclass(frozen=True)
class Defaults:
    """The checkpoint's generation defaults (generation_config.json)."""

    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float


class Backend(Protocol):
    eos_token_ids: frozenset[int]
    defaults: Defaults
    max_model_len: int  # most tokens (prompt + output) a sequence may hold

    def prepare(self, messages: Sequence[Message]) -> Prompt:
        """Render, tokenize and extract features. Thread-safe; runs off the engine thread."""
        ...

    def prefill(self, items: Sequence[tuple[int, Prompt, Sampling]]) -> Iterator[tuple[int, int]]:
        """Start sequences (id, prompt, sampling): fill their KV cache; yield (id, first token) as each is done."""
        ...

    def step(self) -> Mapping[int, int]:
        """One decoding step for every live sequence: sequence id -> its next token."""
        ...

    def release(self, seq_id: int) -> None:
        """Forget a sequence and free its slot."""
        ...

    def detokenize(self, token_ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class CacheStats:
    """What the backend's caches have saved so far (prefix keys and values, audio-encoder outputs)."""

    prefix_hits: int = 0  # prompts that began with tokens whose keys and values were still held
    prefix_cached_tokens: int = 0  # prompt tokens not prefilled again, summed over those prompts
    prefix_entries: int = 0  # finished sequences held in free slots now
    encoder_hits: int = 0  # clips whose encoder output was taken from the cache
    encoder_entries: int = 0
    encoder_bytes: int = 0
