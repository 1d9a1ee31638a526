"""Prompting: domain messages through the checkpoint's own chat template."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.engine.helpers import clip
from ting import errors
from ting.engine.prompt import template_messages
from ting.engine.qwen2_audio import features_span
from ting.types import AudioClip, AudioPart, Message, TextPart

SYSTEM_DEFAULT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
AUDIO = "<|audio_bos|><|AUDIO|><|audio_eos|>"


def render(engine, *messages: Message) -> str:  # type: ignore[no-untyped-def]
    prompt = engine.backend.prepare(messages)
    text = engine.backend.tokenizer.decode(list(prompt.token_ids))
    # collapse each clip's expanded placeholders back to one, to compare with the template's text
    while "<|AUDIO|><|AUDIO|>" in text:
        text = text.replace("<|AUDIO|><|AUDIO|>", "<|AUDIO|>")
    return text


def user(*parts) -> Message:  # type: ignore[no-untyped-def]
    return Message("user", tuple(parts))


def test_the_default_system_prompt_when_none_is_given(engine) -> None:
    text = render(engine, user(AudioPart("a", clip(1)), TextPart("What is said?")))
    assert text == (
        SYSTEM_DEFAULT + f"<|im_start|>user\nAudio 1: {AUDIO}\nWhat is said?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_system_message_replaces_the_default(engine) -> None:
    text = render(engine, Message("system", (TextPart("You transcribe."),)), user(AudioPart("a", clip(1))))
    assert text.startswith("<|im_start|>system\nYou transcribe.<|im_end|>\n<|im_start|>user\nAudio 1: ")


def test_voice_chat_and_several_audios_numbered_across_turns(engine) -> None:
    text = render(
        engine,
        user(AudioPart("a", clip(1)), AudioPart("b", clip(2, 1)), TextPart("Which is louder?")),
        Message("assistant", (TextPart("The second."),)),
        user(AudioPart("c", clip(1, 2))),  # voice chat: audio only
        Message("assistant", (TextPart("Hello!"),)),
        user(TextPart("And in one word?")),  # a text-only follow-up
    )
    assert text == (
        SYSTEM_DEFAULT + f"<|im_start|>user\nAudio 1: {AUDIO}\nAudio 2: {AUDIO}\n"
        "Which is louder?<|im_end|>\n"
        "<|im_start|>assistant\nThe second.<|im_end|>\n"
        f"<|im_start|>user\nAudio 3: {AUDIO}\n<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nAnd in one word?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_each_clip_gets_its_own_token_count(engine) -> None:
    clips = (AudioPart("a", clip(1)), AudioPart("b", clip(30, 1)), AudioPart("c", clip(0.5)))
    prompt = engine.backend.prepare((user(*clips),))
    assert prompt.audio_tokens == (25, 750, 12)
    assert prompt.text_tokens == len(prompt.token_ids) - 787


@pytest.mark.parametrize(
    "messages",
    [
        (),
        (Message("system", (TextPart("x"),)),),
        (Message("assistant", (TextPart("x"),)),),
        (user(TextPart("a")), Message("system", (TextPart("late"),))),
        (Message("assistant", (AudioPart("a", clip(1)),)), user(TextPart("x"))),
    ],
)
def test_malformed_conversations_are_bugs_here(engine, messages) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):  # the wire refuses them first, in each protocol's words
        engine.backend.prepare(messages)


def test_placeholder_tokens_typed_by_a_user_are_refused(engine) -> None:
    with pytest.raises(errors.InvalidParameter):
        engine.backend.prepare((user(TextPart("<|AUDIO|>")),))


@pytest.mark.parametrize("seconds", [(0.1,), (2.6,), (7.31, 0.5), (29.99,), (30.0, 3.3, 12.0), (0.0,)])
def test_features_over_the_clips_span_equal_the_whole_windows_where_the_encoder_reads(engine, seconds) -> None:  # type: ignore[no-untyped-def]
    """prepare extracts log-mel features over the longest clip and a margin, not the 30 s window: every frame the
    encoder reads (a clip's own and the next one), the ids and the mask are the processor's own, bit for bit."""
    rng = np.random.default_rng(len(seconds))
    samples = []
    for s in seconds:
        x = (rng.standard_normal(max(1600, int(s * 16_000))) * rng.uniform(0.001, 0.5)).astype(np.float32)
        samples.append(x if s else np.zeros(16_000, np.float32))  # silence: the normalisation's floor everywhere
    messages = (
        user(
            *(AudioPart(f"a{i}", AudioClip(x, len(x) / 16_000, False, "wav", "pcm")) for i, x in enumerate(samples)),
            TextPart("?"),
        ),
    )
    prompt = engine.backend.prepare(messages)
    shaped, _ = template_messages(messages)
    processor = engine.backend.inputs.processor
    text = processor.apply_chat_template(shaped, add_generation_prompt=True, tokenize=False)
    whole = processor(text=text, audio=samples, sampling_rate=16_000, return_tensors="pt")  # the 30 s window
    assert prompt.token_ids == tuple(whole["input_ids"][0].tolist())
    assert torch.equal(prompt.inputs["feature_attention_mask"], whole["feature_attention_mask"])
    assert prompt.inputs["input_features"].shape == whole["input_features"].shape
    for i, frames in enumerate(whole["feature_attention_mask"].sum(-1).tolist()):
        read = min(frames + 1, 3000)
        assert torch.equal(prompt.inputs["input_features"][i, :, :read], whole["input_features"][i, :, :read])
    assert features_span(16_000 * 30) == 480_000 and features_span(41_600) < 48_000
