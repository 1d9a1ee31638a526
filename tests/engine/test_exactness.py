"""Exactness: with greedy decoding the engine's tokens are `model.generate`'s, alone and batched."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from tests.engine.helpers import PROMPTS
from ting.engine.prompt import template_messages
from ting.types import SamplingParams

MAX_NEW = 24


@pytest.fixture(scope="module")
def reference(tiny_dir: Path):  # type: ignore[no-untyped-def]
    """transformers' own generate(), on its own copy of the checkpoint."""
    model = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_dir)

    def generate(messages, repetition_penalty: float = 1.0) -> list[int]:  # type: ignore[no-untyped-def]
        shaped, clips = template_messages(messages)
        text = processor.apply_chat_template(shaped, add_generation_prompt=True, tokenize=False)
        inputs = processor(
            text=text, audio=[c.samples for c in clips] or None, sampling_rate=16000, return_tensors="pt"
        )
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=MAX_NEW,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                repetition_penalty=repetition_penalty,
            )
        tokens = out[0, inputs.input_ids.shape[1] :].tolist()
        eos = set(model.generation_config.eos_token_id)
        for i, t in enumerate(tokens):  # generate() pads after the end of sequence; the engine stops there
            if t in eos:
                return tokens[: i + 1]
        return tokens

    return generate


async def run(engine, messages, params: SamplingParams, delay_s: float = 0.0) -> list[int]:  # type: ignore[no-untyped-def]
    await asyncio.sleep(delay_s)
    prompt = await engine.prepare(messages)
    tokens: list[int] = []
    async for chunk in engine.generate(prompt, engine.resolve(params, prompt)):
        tokens.extend(chunk.token_ids)
    return tokens


@pytest.mark.parametrize("penalty", [1.0, 1.1])
async def test_alone_the_engine_gives_generates_tokens(engine, reference, penalty: float) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, repetition_penalty=penalty)
    expected = [reference(m, penalty) for m in PROMPTS]
    assert len({tuple(e) for e in expected}) == len(PROMPTS)  # the prompts really lead to different answers
    for messages, want in zip(PROMPTS, expected, strict=True):
        assert await run(engine, messages, params) == want


async def test_batched_with_others_of_different_lengths_the_tokens_do_not_change(engine, reference) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, repetition_penalty=1.1)
    expected = [reference(m, 1.1) for m in PROMPTS]
    steps_before = engine.stats.steps
    # Staggered arrivals: later requests join while earlier ones are mid-way, and leave at different times.
    got = await asyncio.gather(*(run(engine, m, params, delay_s=0.01 * i) for i, m in enumerate(PROMPTS * 2)))
    assert got == expected * 2
    generated = sum(len(t) for t in got)
    # Sequentially this would take one step per token after the first; batching takes far fewer.
    assert engine.stats.steps - steps_before < (generated - len(got)) // 2


async def test_prompts_prefilled_together_in_one_pass_still_give_generates_tokens(engine, reference) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, repetition_penalty=1.1)
    expected = [reference(m, 1.1) for m in PROMPTS]
    before = engine.backend.batched_prefills
    # Prepared first, then submitted all at once (so they are admitted together, however fast a prefill is), under
    # a salt of their own: no earlier request's keys and values are reused, each prompt is prefilled whole.
    prompts = await asyncio.gather(*(engine.prepare(m) for m in PROMPTS))

    async def answer(prompt):  # type: ignore[no-untyped-def]
        stream = engine.generate(prompt, engine.resolve(params, prompt), cache_salt="prefilled together")
        return [t async for chunk in stream for t in chunk.token_ids]

    got = await asyncio.gather(*(answer(p) for p in prompts))
    assert engine.backend.batched_prefills > before
    assert got == expected


@pytest.mark.parametrize("seconds", [0.03, 0.5, 5.0, 17.3, 30.0, 45.0])
def test_the_encoder_over_a_clips_own_frames_matches_the_full_window(engine, seconds: float) -> None:  # type: ignore[no-untyped-def]
    """The backend encodes only a clip's frames; transformers encodes the whole 30 s window."""
    from tests.engine.helpers import ask

    backend = engine.backend
    prompt = backend.prepare(ask(seconds, "x"))
    features = prompt.inputs["input_features"]
    frames = prompt.inputs["feature_attention_mask"]
    with torch.inference_mode():
        mine = backend._encode_clips(features, frames.sum(-1))[0]
        tower = backend.model.model.audio_tower
        after_conv, tokens = tower._get_feat_extract_output_lengths(frames.sum(-1))
        from transformers.masking_utils import create_bidirectional_mask

        valid = (torch.arange(1500)[None, :] < after_conv[:, None]).long()
        mask = create_bidirectional_mask(
            config=tower.config, attention_mask=valid, inputs_embeds=torch.zeros(1, 1500, 1)
        )
        full = backend.model.model.multi_modal_projector(tower(features, attention_mask=mask).last_hidden_state)
        full = full[0, : int(tokens[0])]
    assert mine.shape == full.shape == (prompt.audio_tokens[0], full.shape[-1])
    assert torch.allclose(mine, full, rtol=1e-4, atol=1e-4), float((mine - full).abs().max())


async def test_without_room_for_a_blocked_weight_copy_batched_steps_take_the_chunked_path_and_stay_exact(  # type: ignore[no-untyped-def]
    tiny_dir: Path, reference, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from ting.engine import Engine, qwen2_audio

    assert (qwen2_audio.available_memory_bytes() or 0) > 0
    monkeypatch.setattr(qwen2_audio, "available_memory_bytes", lambda: 1024**3)  # 1 GiB: less than the headroom
    with caplog.at_level("WARNING", logger="ting.engine"):
        engine = Engine.load(str(tiny_dir), max_batch_size=8)
    assert "does not fit" in caplog.text
    linears = [m for m in engine.backend.lm.modules() if type(m) is torch.nn.Linear]
    assert linears and not any(hasattr(m, "_ting_blocked") for m in linears)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, repetition_penalty=1.1)
    expected = [reference(m, 1.1) for m in PROMPTS]
    engine.start()
    try:
        steps_before = engine.stats.steps
        got = await asyncio.gather(*(run(engine, m, params, delay_s=0.01 * i) for i, m in enumerate(PROMPTS * 2)))
        assert engine.stats.steps - steps_before < sum(len(t) for t in got) // 2  # really batched
    finally:
        engine.stop()
    assert got == expected * 2


def test_with_room_the_blocked_copy_is_made(tiny_dir: Path) -> None:
    from ting.engine import qwen2_audio

    backend = qwen2_audio.load(str(tiny_dir), max_batch_size=2)
    linears = [m for m in backend.lm.modules() if type(m) is torch.nn.Linear]
    assert linears and all(hasattr(m, "_ting_blocked") for m in linears)
