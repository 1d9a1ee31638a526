"""Prompting: domain messages through the checkpoint's own chat template."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.engine.helpers import clip
from ting import errors
from ting.engine.prompt import template_messages
from ting.engine.qwen2_audio import audio_hashes, features_span
from ting.types import AudioClip, AudioPart, Message, TextPart, audio_tokens_for_frames

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


def _clips(kind: str, seconds: tuple[float, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(len(seconds) + len(kind))
    out = []
    for s in seconds:
        n = max(1, int(s * 16_000))
        if kind == "silence":
            x = np.zeros(n, np.float32)
        elif kind == "full scale":  # noise at +-1, and a square wave clipped at full scale
            x = rng.uniform(-1.0, 1.0, n) if len(out) % 2 == 0 else np.sign(np.sin(np.arange(n) * 0.05))
        else:
            x = rng.standard_normal(n) * rng.uniform(0.001, 0.5)
        out.append(x.astype(np.float32))
    return out


SPANS = [
    ("speech", (0.1,)),
    ("speech", (0.03,)),  # 480 samples: 3 frames, one audio token
    ("speech", (0.01,)),  # 160 samples: one frame, no audio token at all
    ("speech", (2.6,)),
    ("speech", (7.31, 0.5)),
    ("speech", (29.99,)),
    ("speech", (30.0,)),
    ("speech", (45.0, 1.0)),  # past the window: cut to 30 s, as the processor cuts it
    ("speech", (30.0, 3.3, 12.0)),
    ("silence", (1.0,)),  # the normalisation's floor everywhere
    ("silence", (4.0, 0.2)),
    ("full scale", (5.0,)),
    ("full scale", (30.0, 2.0)),
]


@pytest.mark.parametrize(("kind", "seconds"), SPANS, ids=[f"{k} {s}" for k, s in SPANS])
def test_the_prompt_is_the_processors_own_bit_for_bit(engine, kind, seconds) -> None:  # type: ignore[no-untyped-def]
    """prepare computes the log-mel features itself (qwen2_audio.LogMel: the extractor's torch operations over the
    longest clip and a margin, not the 30 s window) and expands the audio placeholders in the ids, not the text.
    Against the processor's own output over the whole window: the ids, the audio token counts, the mask, every
    frame the encoder reads (a clip's own and the next one), and the digests that key the prefix cache."""
    samples = _clips(kind, seconds)
    messages = (
        user(
            *(AudioPart(f"a{i}", AudioClip(x, len(x) / 16_000, False, "wav", "pcm")) for i, x in enumerate(samples)),
            TextPart("?"),
        ),
    )
    inputs = engine.backend.inputs
    prompt = inputs.prepare(messages)
    shaped, _ = template_messages(messages)
    processor = inputs.processor
    text = processor.apply_chat_template(shaped, add_generation_prompt=True, tokenize=False)
    whole = processor(text=text, audio=samples, sampling_rate=16_000, return_tensors="pt")  # the 30 s window
    frames = whole["feature_attention_mask"].sum(-1).tolist()
    assert prompt.token_ids == tuple(whole["input_ids"][0].tolist())
    assert prompt.audio_tokens == tuple(audio_tokens_for_frames(f) for f in frames)
    assert prompt.inputs["feature_attention_mask"].dtype == whole["feature_attention_mask"].dtype
    assert torch.equal(prompt.inputs["feature_attention_mask"], whole["feature_attention_mask"])
    assert prompt.inputs["input_features"].dtype == whole["input_features"].dtype
    assert prompt.inputs["input_features"].shape == whole["input_features"].shape
    for i, n in enumerate(frames):
        read = min(n + 1, 3000)
        assert torch.equal(prompt.inputs["input_features"][i, :, :read], whole["input_features"][i, :, :read])
    assert prompt.audio_hashes == audio_hashes(whole)
    assert len(set(prompt.audio_hashes)) == len(set(map(bytes, (x.tobytes() for x in samples))))


def test_the_tiny_checkpoints_features_are_made_without_the_processor(engine) -> None:  # type: ignore[no-untyped-def]
    assert engine.backend.inputs.log_mel is not None  # its extractor is Whisper's, which LogMel reproduces


def test_a_text_only_prompt_is_the_processors_own(engine) -> None:  # type: ignore[no-untyped-def]
    messages = (Message("system", (TextPart("Be brief <|im_end|> ok."),)), user(TextPart("Hi 你好 <|endoftext|>")))
    prompt = engine.backend.prepare(messages)
    processor = engine.backend.inputs.processor
    shaped, _ = template_messages(messages)
    text = processor.apply_chat_template(shaped, add_generation_prompt=True, tokenize=False)
    assert prompt.token_ids == tuple(processor(text=text, return_tensors="pt")["input_ids"][0].tolist())
    assert (prompt.audio_tokens, prompt.inputs, prompt.audio_hashes) == ((), None, ())


def test_a_feature_extractor_logmel_does_not_reproduce_goes_through_the_processor(engine) -> None:  # type: ignore[no-untyped-def]
    """Another extractor (here: Whisper's with dithering) is not copied: the processor runs as it is."""
    import copy

    from ting.engine.qwen2_audio import Qwen2AudioInputs

    processor = copy.deepcopy(engine.backend.inputs.processor)
    processor.feature_extractor.padding_value = 1e-3
    inputs = Qwen2AudioInputs(processor)
    assert inputs.log_mel is None
    samples = _clips("speech", (2.0,))
    messages = (user(AudioPart("a", AudioClip(samples[0], 2.0, False, "wav", "pcm")), TextPart("?")),)
    prompt = inputs.prepare(messages)
    shaped, _ = template_messages(messages)
    text = processor.apply_chat_template(shaped, add_generation_prompt=True, tokenize=False)
    whole = processor(text=text, audio=samples, sampling_rate=16_000, return_tensors="pt")
    assert prompt.token_ids == tuple(whole["input_ids"][0].tolist())
    assert prompt.audio_tokens == (50,)


def test_features_span() -> None:
    assert features_span(16_000 * 30) == 480_000 and features_span(41_600) == 42_880
    assert features_span(16_000 * 45) == 480_000 and features_span(1) == 16_000  # never under a second


def _read_only(x: np.ndarray) -> np.ndarray:
    """Samples as the decoder hands them over: a view of immutable bytes."""
    return np.frombuffer(x.astype(np.float32).tobytes(), dtype=np.float32)


def _ask(*clips: np.ndarray) -> tuple[Message, ...]:
    parts = [AudioPart(f"a{i}", AudioClip(x, len(x) / 16_000, False, "wav", "pcm")) for i, x in enumerate(clips)]
    return (user(*parts, TextPart("?")),)


def _same(a, b) -> bool:  # type: ignore[no-untyped-def]
    return (
        a.token_ids == b.token_ids
        and a.audio_tokens == b.audio_tokens
        and a.audio_hashes == b.audio_hashes
        and all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)
    )


def test_a_follow_up_turn_reuses_its_clips_features(tiny_dir) -> None:  # type: ignore[no-untyped-def]
    """Every turn resends the history, and the audio cache hands back the same decoded clip: its features are
    found by that array, not extracted again, and the prompt is the same as extracted afresh."""
    from ting.engine.qwen2_audio import load_inputs

    inputs = load_inputs(tiny_dir)
    first, second = _read_only(_clips("speech", (30.0,))[0]), _read_only(_clips("speech", (2.6,))[0])
    turn1 = inputs.prepare(_ask(first))
    assert inputs.features.hits == 0
    turn2 = inputs.prepare(_ask(first, second))
    assert inputs.features.hits == 1  # the first clip; the second is new
    again = inputs.prepare(_ask(first, second))
    assert inputs.features.hits == 3
    fresh = load_inputs(tiny_dir).prepare(_ask(first, second))
    assert _same(turn2, fresh) and _same(again, fresh)
    assert turn1.audio_hashes == turn2.audio_hashes[:1]


def test_only_the_very_read_only_array_finds_its_features(tiny_dir) -> None:  # type: ignore[no-untyped-def]
    from ting.engine.qwen2_audio import load_inputs

    inputs = load_inputs(tiny_dir)
    samples = _clips("speech", (1.0,))[0]
    inputs.prepare(_ask(samples))
    inputs.prepare(_ask(samples))  # writeable: it could change under an entry, so it is never kept
    copy_of = _read_only(samples)
    inputs.prepare(_ask(copy_of))
    inputs.prepare(_ask(_read_only(samples)))  # equal samples, another array: extracted again
    assert inputs.features.hits == 0
    inputs.prepare(_ask(copy_of))
    assert inputs.features.hits == 1


def test_the_feature_cache_is_bounded_by_bytes(tiny_dir) -> None:  # type: ignore[no-untyped-def]
    from ting.engine.qwen2_audio import Qwen2AudioInputs, load_inputs

    processor = load_inputs(tiny_dir).processor
    inputs = Qwen2AudioInputs(processor, feature_cache_bytes=2 * 128 * 400 * 4)  # two clips of 400 frames
    clips = [_read_only(x) for x in _clips("speech", (3.5, 3.6, 3.7))]
    for x in clips:
        inputs.prepare(_ask(x))
    inputs.prepare(_ask(clips[0]))  # the least recently used: evicted by the third
    assert inputs.features.hits == 0
    inputs.prepare(_ask(clips[2]))
    assert inputs.features.hits == 1
    assert inputs.features._bytes <= inputs.features.limit_bytes
