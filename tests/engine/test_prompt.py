"""Prompting: domain messages through the checkpoint's own chat template."""

from __future__ import annotations

import pytest

from tests.engine.helpers import clip
from ting import errors
from ting.types import AudioPart, Message, TextPart

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
