"""The domain vocabulary every layer shares.

These are plain frozen dataclasses: the wire protocols convert their JSON into them, the service and the
engine pass them along, and nothing else travels between layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

SAMPLE_RATE = 16_000  # Hz: what Qwen2-Audio's feature extractor expects
WINDOW_S = 30.0  # seconds: the model hears at most this much of each clip
WINDOW_SAMPLES = int(SAMPLE_RATE * WINDOW_S)  # 480_000 samples
HOP_SAMPLES = 160  # samples per mel frame (10 ms at 16 kHz)
WINDOW_FRAMES = WINDOW_SAMPLES // HOP_SAMPLES  # 3000 mel frames in the 30 s window
MIN_SAMPLES = 400  # shortest clip accepted: 25 ms at 16 kHz (the model yields 0 tokens at 320 samples or fewer)


def audio_tokens_for_frames(frames: int) -> int:
    """Qwen2-Audio's audio tokens for a clip of `frames` mel frames: its encoder halves the length twice (a stride-2
    convolution, then average pooling). The one copy of the rule; tests hold it to transformers' own."""
    if frames <= 0:
        return 0
    return max(((frames - 1) // 2 + 1 - 2) // 2 + 1, 0)


# Bounds both wire protocols apply to a chat request while validating it, before anything else: far beyond any prompt
# the model can take (6,144 tokens for the hosted names), so no real user meets them, and absurd bodies (a 30 MiB
# text, a million messages) are refused for the cost of parsing them. The service's cheap estimate comes next.
MAX_TEXT_CHARS = 1_048_576  # characters in one text
MAX_MESSAGES = 1_024  # messages in one request
MAX_PARTS = 64  # content parts in one message

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, eq=False)
class AudioClip:
    """Decoded audio, ready for the model."""

    samples: np.ndarray  # float32, mono, 16 kHz, values in [-1, 1]
    duration_s: float | None  # duration of the original recording when the container knows it
    truncated: bool  # True when decoding stopped at the length limit
    container: str  # the sniffed container ("wav", "mp3", "amr", "mov", ...)
    codec: str  # the codec of the decoded stream ("pcm_s16le", "amr_nb", ...)

    @property
    def seconds(self) -> float:
        """Length of the decoded samples, in seconds."""
        return len(self.samples) / SAMPLE_RATE


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class AudioPart:
    source: str  # an http(s) URL, a data: URI or an oss:// key, exactly as the user sent it
    clip: AudioClip | None = None  # filled in once fetched and decoded


Part = TextPart | AudioPart


@dataclass(frozen=True)
class Message:
    role: Role
    parts: tuple[Part, ...]

    @property
    def audio_parts(self) -> tuple[AudioPart, ...]:
        return tuple(p for p in self.parts if isinstance(p, AudioPart))


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. None means "the checkpoint's generation_config default"."""

    max_tokens: int | None = None  # most output tokens; None: the model's maximum
    temperature: float | None = None  # 0 means greedy
    top_p: float | None = None  # nucleus mass in (0, 1]
    top_k: int | None = None  # 0 or None disables the top-k filter
    seed: int | None = None  # same seed, same answer
    repetition_penalty: float | None = None  # multiplicative, 1.0 = none (as in transformers)
    presence_penalty: float = 0.0  # additive, OpenAI style, on tokens already generated
    frequency_penalty: float = 0.0  # additive per occurrence, OpenAI style
    stop: tuple[str, ...] = ()  # generation ends before any of these strings
    stop_token_ids: tuple[int, ...] = ()  # generation ends at any of these tokens
    ignore_eos: bool = False  # benchmarks only: keep going past end-of-sequence


@dataclass(frozen=True)
class ChatRequest:
    """One request, as both wire protocols describe it."""

    model: str  # the name the client asked for
    messages: tuple[Message, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)

    @property
    def audio_parts(self) -> tuple[AudioPart, ...]:
        return tuple(p for m in self.messages for p in m.audio_parts)

    @property
    def text_chars(self) -> int:
        """Characters of text in all the messages (not the chat template)."""
        return sum(len(p.text) for m in self.messages for p in m.parts if isinstance(p, TextPart))


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0  # prompt tokens that are not audio (text and chat template)
    audio_tokens: int = 0  # audio tokens billed (25 per second, at least 25 per clip)
    output_tokens: int = 0  # generated tokens
    cached_tokens: int = 0  # of the prompt's tokens, those whose keys and values were reused (still billed)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.audio_tokens + self.output_tokens


@dataclass(frozen=True)
class GenerationChunk:
    """What the engine yields per decoding step for one request."""

    text: str  # text added since the previous chunk (never a partial UTF-8 character)
    token_ids: tuple[int, ...]  # tokens generated since the previous chunk
    finish_reason: FinishReason | None  # None until the last chunk
    usage: Usage  # running totals
