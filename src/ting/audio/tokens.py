"""The one audio-token rule.

Qwen2-Audio's feature extractor makes one mel frame per 10 ms (hop 160 samples at 16 kHz, rounded up), pads
or cuts to 3000 frames (30 s), and the encoder halves the length twice (a stride-2 convolution, then
average pooling). That is 25 tokens per second and 750 per 30 s window. The hosted API bills at least 25
per clip.
"""

from __future__ import annotations

from ting.types import HOP_SAMPLES, WINDOW_FRAMES, audio_tokens_for_frames

MIN_BILLED_TOKENS = 25  # the hosted API bills at least one second of audio per clip


def audio_tokens(num_samples: int) -> int:
    """Audio tokens Qwen2-Audio's processor yields for a clip of `num_samples` at 16 kHz."""
    if num_samples <= 0:
        return 0
    return audio_tokens_for_frames(min(-(-num_samples // HOP_SAMPLES), WINDOW_FRAMES))  # ceil, then the 30 s window


def billed_audio_tokens(num_samples: int) -> int:
    """Audio tokens billed for a clip: what the model sees, but at least 25."""
    return max(audio_tokens(num_samples), MIN_BILLED_TOKENS)
