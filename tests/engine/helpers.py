"""Requests for the engine tests: decoded clips of various lengths and the messages that carry them."""

from __future__ import annotations

import numpy as np

from ting.types import AudioClip, AudioPart, Message, SamplingParams, TextPart


def clip(seconds: float, seed: int = 0) -> AudioClip:
    rng = np.random.default_rng(seed)
    samples = (
        0.3 * np.sin(np.arange(int(seconds * 16000)) * (0.01 + 0.01 * seed))
        + 0.05 * rng.standard_normal(int(seconds * 16000))
    ).astype(np.float32)
    return AudioClip(samples=samples, duration_s=seconds, truncated=False, container="wav", codec="pcm_s16le")


def ask(seconds: float, text: str, seed: int = 0) -> tuple[Message, ...]:
    return (Message("user", (AudioPart("test", clip(seconds, seed)), TextPart(text))),)


GREEDY = SamplingParams(temperature=0.0, max_tokens=24)

# Prompts of different lengths: audio from 0.5 s to 30 s, with and without text.
PROMPTS = [
    ask(3.0, "What is said?", 0),
    ask(1.5, "Hi", 1),
    ask(7.0, "Describe the sound in great detail, please.", 2),
    ask(0.5, "转写这段语音。", 3),
    ask(30.0, "What do you hear?", 4),
    (Message("user", (AudioPart("voice chat", clip(2.0, 5)),)),),
]
