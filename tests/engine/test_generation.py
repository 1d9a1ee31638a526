"""Sampling, stops, limits, streaming, abort, overload and faults."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Mapping
from dataclasses import replace

import pytest

from tests.engine.helpers import PROMPTS
from ting import errors
from ting.engine import Engine
from ting.types import GenerationChunk, SamplingParams


async def collect(engine: Engine, messages, params: SamplingParams) -> list[GenerationChunk]:  # type: ignore[no-untyped-def]
    prompt = await engine.prepare(messages)
    return [c async for c in engine.generate(prompt, engine.resolve(params, prompt))]


def tokens(chunks: list[GenerationChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text(chunks: list[GenerationChunk]) -> str:
    return "".join(c.text for c in chunks)


SAMPLE = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=24, seed=1234)


async def test_same_seed_same_answer_alone_or_batched(engine: Engine) -> None:
    alone = tokens(await collect(engine, PROMPTS[0], SAMPLE))
    again = tokens(await collect(engine, PROMPTS[0], SAMPLE))
    crowd = await asyncio.gather(
        collect(engine, PROMPTS[0], SAMPLE),
        *(collect(engine, p, SamplingParams(temperature=1.0, max_tokens=30)) for p in PROMPTS[1:]),
    )
    assert alone == again == tokens(crowd[0])
    other = tokens(
        await collect(
            engine, PROMPTS[0], SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=24, seed=4321)
        )
    )
    assert other != alone


async def test_greedy_ignores_the_seed_and_top_k_1_is_greedy(engine: Engine) -> None:
    greedy = tokens(await collect(engine, PROMPTS[2], SamplingParams(temperature=0, max_tokens=16, seed=1)))
    assert tokens(await collect(engine, PROMPTS[2], SamplingParams(temperature=0, max_tokens=16, seed=2))) == greedy
    assert (
        tokens(await collect(engine, PROMPTS[2], SamplingParams(temperature=1.5, top_k=1, max_tokens=16, seed=3)))
        == greedy
    )


async def test_sampling_without_a_seed_varies(engine: Engine) -> None:
    params = SamplingParams(temperature=1.5, top_p=1.0, top_k=0, max_tokens=16)
    answers = {tuple(tokens(await collect(engine, PROMPTS[1], params))) for _ in range(4)}
    assert len(answers) > 1


async def test_max_tokens_ends_with_length_and_counts_are_exact(engine: Engine) -> None:
    chunks = await collect(engine, PROMPTS[0], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
    assert len(tokens(chunks)) == 7 and chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    prompt = await engine.prepare(PROMPTS[0])
    usage = chunks[-1].usage
    assert (usage.input_tokens, usage.audio_tokens, usage.output_tokens) == (prompt.text_tokens, 75, 7)
    assert usage.input_tokens + usage.audio_tokens == len(prompt.token_ids)
    assert [c.usage.output_tokens for c in chunks] == list(range(1, 8))


async def test_a_stop_string_ends_the_answer_before_it(engine: Engine) -> None:
    full = text(await collect(engine, PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)))
    cut = next(i for i in range(3, len(full) - 2) if full[i : i + 2].strip() and "\ufffd" not in full[i : i + 2])
    stop = full[cut : cut + 2]
    chunks = await collect(
        engine, PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=(stop,))
    )
    assert text(chunks) == full[: full.find(stop)]
    assert chunks[-1].finish_reason == "stop"
    for i in range(len(chunks)):  # never streamed past the stop string, at any point
        assert full[: full.find(stop)].startswith(text(chunks[: i + 1]))


async def test_a_stop_token_ends_the_answer_without_it(engine: Engine) -> None:
    full = tokens(await collect(engine, PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)))
    stop_id = full[5]
    chunks = await collect(
        engine, PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=(stop_id,))
    )
    assert tokens(chunks) == full[: full.index(stop_id) + 1]
    assert chunks[-1].finish_reason == "stop"
    assert text(chunks) == engine.backend.detokenize(full[: full.index(stop_id)])


async def test_penalties_change_the_answer(engine: Engine) -> None:
    base = SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.0, ignore_eos=True)
    plain = tokens(await collect(engine, PROMPTS[3], base))
    for changed in (
        SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.5, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.0, presence_penalty=2.0, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.0, frequency_penalty=2.0, ignore_eos=True),
    ):
        assert tokens(await collect(engine, PROMPTS[3], changed)) != plain


async def test_streamed_text_is_the_decoded_answer(engine: Engine) -> None:
    for messages in PROMPTS:
        chunks = await collect(engine, messages, SamplingParams(temperature=0.8, max_tokens=32, seed=7))
        out = tokens(chunks)
        eos = out[-1] in engine.backend.eos_token_ids
        assert text(chunks) == engine.backend.detokenize(out[:-1] if eos else out)


async def test_a_closed_stream_frees_its_slot_before_the_next_step(engine: Engine) -> None:
    prompt = await engine.prepare(PROMPTS[0])
    stream = engine.generate(
        prompt, engine.resolve(SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True), prompt)
    )
    for _ in range(3):
        await anext(stream)
    aborted_before = engine.stats.aborted
    steps_at_close = engine.stats.steps
    await stream.aclose()  # the client went away
    for _ in range(200):
        if engine.stats.aborted > aborted_before and engine.stats.running == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats.aborted == aborted_before + 1
    assert engine.stats.running == 0
    assert engine.stats.steps - steps_at_close <= 1  # at most the step already under way
    assert tokens(await collect(engine, PROMPTS[1], SamplingParams(temperature=0, max_tokens=4)))


async def test_past_the_admission_queue_requests_are_refused_at_once(tiny_dir) -> None:  # type: ignore[no-untyped-def]
    engine = Engine.load(str(tiny_dir), max_batch_size=1, max_queue=2)
    engine.start()
    try:
        prompt = await engine.prepare(PROMPTS[1])
        long = engine.resolve(SamplingParams(temperature=0, max_tokens=500, ignore_eos=True), prompt)
        streams = [engine.generate(prompt, long) for _ in range(3)]
        first = await anext(streams[0])  # running
        assert first.token_ids
        waiting = [asyncio.ensure_future(anext(s)) for s in streams[1:]]  # queued
        await asyncio.sleep(0.05)
        extra = engine.generate(prompt, long)
        with pytest.raises(errors.Overloaded) as info:
            await anext(extra)
        assert info.value.status == 503 and info.value.retry_after_s
        for w in waiting:
            w.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        for s in streams:
            await s.aclose()
    finally:
        engine.stop()


class FailingBackend:
    """Wraps a real backend; its `step` raises on chosen calls (a model fault)."""

    def __init__(self, inner, fail_on: set[int]) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.fail_on, self.calls = inner, fail_on, 0
        self.eos_token_ids, self.defaults, self.max_model_len = inner.eos_token_ids, inner.defaults, inner.max_model_len
        self.prepare, self.prefill, self.release, self.detokenize = (
            inner.prepare,
            inner.prefill,
            inner.release,
            inner.detokenize,
        )

    def step(self) -> Mapping[int, int]:
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("simulated CUDA error")
        return self.inner.step()


async def test_a_model_fault_fails_the_requests_in_flight_and_the_engine_carries_on(engine: Engine) -> None:
    faulty = Engine(FailingBackend(engine.backend, {3}), max_batch_size=8)
    engine.stop()  # share the weights: only one engine may drive this backend at a time
    faulty.start()
    try:
        with pytest.raises(errors.EngineError):
            await collect(faulty, PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
        after = await collect(faulty, PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
        assert len(tokens(after)) == 10
    finally:
        faulty.stop()
        engine.scheduler = type(engine.scheduler)(engine.backend, max_batch_size=8, max_queue=64)
        engine.start()


class GatedBackend:
    """Wraps a real backend; its first prefill waits for `gate`, so that requests submitted meanwhile queue up and
    are admitted together. Records the size of every prefill."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.gate, self.sizes = inner, threading.Event(), []
        self.eos_token_ids, self.defaults, self.max_model_len = inner.eos_token_ids, inner.defaults, inner.max_model_len
        self.prepare, self.step, self.release, self.detokenize = (
            inner.prepare,
            inner.step,
            inner.release,
            inner.detokenize,
        )

    def prefill(self, items):  # type: ignore[no-untyped-def]
        self.sizes.append(len(items))
        if len(self.sizes) == 1:
            self.gate.wait(120)
        return self.inner.prefill(items)


async def until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(6000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"gave up waiting: {what}")


async def test_a_request_the_model_cannot_take_fails_alone_not_its_batch_mates(engine: Engine) -> None:
    gated = GatedBackend(engine.backend)
    isolated = Engine(gated, max_batch_size=8)
    engine.stop()  # share the weights: only one engine may drive this backend at a time
    isolated.start()
    try:
        prompt = await isolated.prepare(PROMPTS[1])
        good = isolated.resolve(SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), prompt)
        bad = replace(good, seed=2**64)  # injected past the wire and past resolve(): torch refuses it
        blocker = asyncio.ensure_future(collect_stream(isolated, prompt, good))
        await until(lambda: gated.sizes == [1], "the first prefill")
        mates = [asyncio.ensure_future(collect_stream(isolated, prompt, s)) for s in (good, bad, good)]
        await until(lambda: isolated.stats.waiting == 3, "three queued requests")
        gated.gate.set()
        expected = tokens(await blocker)
        results = await asyncio.gather(*mates, return_exceptions=True)
        assert 3 in gated.sizes  # the three were prefilled together first
        assert isinstance(results[1], errors.EngineError)
        assert tokens(results[0]) == tokens(results[2]) == expected  # greedy: exactly the lone answer
        await until(lambda: isolated.stats.running == 0, "every slot free again")
    finally:
        gated.gate.set()
        isolated.stop()
        engine.scheduler = type(engine.scheduler)(engine.backend, max_batch_size=8, max_queue=64)
        engine.start()


async def collect_stream(engine: Engine, prompt, sampling) -> list[GenerationChunk]:  # type: ignore[no-untyped-def]
    return [c async for c in engine.generate(prompt, sampling)]


@pytest.mark.parametrize(
    "bad",
    [
        dict(seed=2**64),
        dict(seed=-(2**63) - 1),
        dict(repetition_penalty=math.inf),
        dict(repetition_penalty=math.nan),
        dict(temperature=math.nan),
    ],
)
async def test_parameters_the_model_cannot_take_are_refused_before_the_engine(engine: Engine, bad) -> None:  # type: ignore[no-untyped-def]
    prompt = await engine.prepare(PROMPTS[1])
    with pytest.raises(errors.InvalidParameter):
        engine.resolve(SamplingParams(max_tokens=4, **bad), prompt)


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(max_tokens=0)])
async def test_ranges_are_the_wires_to_check_and_an_invariant_here(engine: Engine, bad) -> None:  # type: ignore[no-untyped-def]
    """Both wires refuse these in their own words; one reaching the engine is a bug (ValueError, a 500), not a
    second, differently worded user error."""
    prompt = await engine.prepare(PROMPTS[1])
    with pytest.raises(ValueError, match="past the wire"):
        engine.resolve(SamplingParams(**({"max_tokens": 4} | bad)), prompt)
