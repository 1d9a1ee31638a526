"""Prefix reuse: a follow-up turn prefills only what is new, and its greedy tokens are still generate()'s.

The backend is driven directly (prefill, steps, release: the real calls the scheduler makes) where a test needs to
know which prompts share a prefill pass or which slots are taken; the Engine and the engine process where the
usage a client sees is checked. Every answer is compared with transformers' generate() on the whole prompt.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.engine import test_exactness
from tests.engine.helpers import PROMPTS, ask, clip
from ting.engine import Engine, Prompt, resolve_sampling
from ting.engine.process import EngineOptions, RemoteEngine
from ting.engine.qwen2_audio import Qwen2AudioBackend, load
from ting.types import AudioPart, GenerationChunk, Message, SamplingParams, TextPart, Usage

reference = test_exactness.reference  # the fixture: transformers' generate() on the same checkpoint
MAX_NEW = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, repetition_penalty=1.0)


def turn1(seconds: float = 3.0, seed: int = 0) -> tuple[Message, ...]:
    return ask(seconds, "What is said?", seed)


def turn2(answer: str, seconds: float = 3.0, seed: int = 0) -> tuple[Message, ...]:
    """The SDK's follow-up: the whole history again (same audio), the answer, a text-only question."""
    return (
        Message("user", (AudioPart("test", clip(seconds, seed)), TextPart("What is said?"))),
        Message("assistant", (TextPart(answer),)),
        Message("user", (TextPart("And who is speaking?"),)),
    )


def backend_of(tiny_dir: Path, *, slots: int = 4, prefix_caching: bool = True, kept: int = 0) -> Qwen2AudioBackend:
    return load(str(tiny_dir), max_batch_size=slots, prefix_caching=prefix_caching, prefix_cache_slots=kept)


def drive(
    backend: Qwen2AudioBackend, requests: Sequence[tuple[Sequence[Message] | Prompt, str]]
) -> list[tuple[list[int], int]]:
    """Prefill the requests (messages or a prepared prompt, salt) together, step until each ends, release each as
    it ends: per request its tokens and the prompt tokens reused."""
    items = []
    for i, (asked, salt) in enumerate(requests):
        prompt = replace(asked if isinstance(asked, Prompt) else backend.prepare(asked), cache_salt=salt)
        items.append((i, prompt, resolve_sampling(GREEDY, prompt, backend.defaults, backend.max_model_len)))
    out: dict[int, list[int]] = {i: [] for i in range(len(items))}
    cached: dict[int, int] = {}
    live = set(out)

    def take(seq_id: int, token: int) -> None:
        out[seq_id].append(token)
        if token in backend.eos_token_ids or len(out[seq_id]) >= MAX_NEW:
            live.discard(seq_id)
            backend.release(seq_id)

    for seq_id, token in backend.prefill(items):
        cached[seq_id] = backend.cached_tokens(seq_id)
        take(seq_id, token)
    while live:
        for seq_id, token in backend.step().items():
            take(seq_id, token)
    return [(out[i], cached[i]) for i in range(len(items))]


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def prompt_length(backend: Qwen2AudioBackend, messages: Sequence[Message]) -> int:
    return len(backend.prepare(messages).token_ids)


def first_audio_position(backend: Qwen2AudioBackend, messages: Sequence[Message]) -> int:
    return backend.prepare(messages).token_ids.index(backend.audio_token_id)


def test_a_follow_up_alone_prefills_only_its_new_part_and_answers_as_generate(tiny_dir: Path, reference) -> None:  # type: ignore[no-untyped-def]
    backend = backend_of(tiny_dir)
    [(first, cached)] = drive(backend, [(turn1(), "a")])
    assert first == reference(turn1())[:MAX_NEW] and cached == 0
    follow = turn2(backend.detokenize(first))
    encoded_before = backend.cache_stats().encoder_hits
    [(second, cached)] = drive(backend, [(follow, "a")])
    assert second == reference(follow)[:MAX_NEW]
    # The whole first prompt was reused, and of the answer what the follow-up's tokens repeat (the tiny model's
    # random tokens do not always come back the same from their text; a real model's answer does).
    held = [*backend.prepare(turn1()).token_ids, *first[:-1]]
    assert cached == shared_prefix(held, backend.prepare(follow).token_ids) >= prompt_length(backend, turn1())
    assert backend.cache_stats().prefix_hits >= 1
    # The audio was inside the reused prefix: the encoder had nothing to do for it, not even a cache lookup.
    assert backend.cache_stats().encoder_hits == encoded_before


def test_a_hit_batched_with_misses_gives_generates_tokens(tiny_dir: Path, reference) -> None:  # type: ignore[no-untyped-def]
    backend = backend_of(tiny_dir)
    [(first, _)] = drive(backend, [(turn1(), "a")])
    follow = turn2(backend.detokenize(first))
    batched = backend.batched_prefills
    # One prefill pass: the follow-up (a hit, its suffix at positions past its prefix) with two fresh prompts of
    # another key (no entry of theirs: full prompts from position 0), right-padded together.
    got = drive(backend, [(PROMPTS[2], "b"), (follow, "a"), (PROMPTS[3], "b")])
    assert backend.batched_prefills == batched + 1
    assert [tokens for tokens, _ in got] == [reference(m)[:MAX_NEW] for m in (PROMPTS[2], follow, PROMPTS[3])]
    assert got[0][1] == 0 and got[2][1] == 0
    assert got[1][1] >= prompt_length(backend, turn1())


def test_a_prompt_extending_a_whole_entry_takes_its_slot_as_it_is(tiny_dir: Path) -> None:
    """The follow-up of a real model repeats the answer's tokens exactly: the new sequence takes the entry's slot
    (nothing copied) and prefills only what comes after. Its tokens equal a backend's without the cache (whose
    tokens the exactness tests hold equal to generate()'s), alone and batched with a miss."""
    backend, plain = backend_of(tiny_dir), backend_of(tiny_dir, prefix_caching=False)
    first_prompt = backend.prepare(turn1())
    [(first, _)] = drive(backend, [(first_prompt, "a")])
    tail = backend.prepare((Message("user", (TextPart("And then?"),)),)).token_ids
    follow = replace(first_prompt, token_ids=(*first_prompt.token_ids, *first, *tail))
    assert backend.cache_stats().prefix_entries == 1
    [(alone, cached)] = drive(backend, [(follow, "a")])
    assert cached == len(first_prompt.token_ids) + len(first) - 1  # all the entry held
    assert alone == drive(plain, [(follow, "a")])[0][0]
    # Again, batched with a miss: now the whole prompt is held, and its last token is prefilled again for logits.
    got = drive(backend, [(PROMPTS[4], "b"), (follow, "a")])
    assert got[1][1] == len(follow.token_ids) - 1
    assert [t for t, _ in got] == [t for t, _ in drive(plain, [(PROMPTS[4], "b"), (follow, "a")])]


def test_two_hits_and_a_miss_batched_each_from_its_own_entry(tiny_dir: Path, reference) -> None:  # type: ignore[no-untyped-def]
    backend = backend_of(tiny_dir, slots=6)
    answers = drive(backend, [(turn1(seed=0), "a"), (turn1(seed=4), "a")])
    follows = [turn2(backend.detokenize(t), seed=s) for (t, _), s in zip(answers, (0, 4), strict=True)]
    got = drive(backend, [(follows[1], "a"), (PROMPTS[1], "a"), (follows[0], "a")])
    assert [t for t, _ in got] == [reference(m)[:MAX_NEW] for m in (follows[1], PROMPTS[1], follows[0])]
    assert got[0][1] >= prompt_length(backend, turn1()) and got[2][1] >= prompt_length(backend, turn1())


def test_the_same_text_with_other_audio_does_not_reuse_the_audio(tiny_dir: Path, reference) -> None:  # type: ignore[no-untyped-def]
    backend = backend_of(tiny_dir)
    [(first, _)] = drive(backend, [(turn1(seed=0), "a")])
    other = turn2(backend.detokenize(first), seed=7)  # another recording of the same length: equal token ids
    assert backend.prepare(other).token_ids[: prompt_length(backend, turn1())] == backend.prepare(turn1()).token_ids
    [(second, cached)] = drive(backend, [(other, "a")])
    assert cached <= first_audio_position(backend, other)  # at most the chat template before the audio
    assert second == reference(other)[:MAX_NEW]


def test_another_key_never_reuses_a_prefix(tiny_dir: Path, reference) -> None:  # type: ignore[no-untyped-def]
    backend = backend_of(tiny_dir)
    [(first, _)] = drive(backend, [(turn1(), "a")])
    follow = turn2(backend.detokenize(first))
    [(second, cached)] = drive(backend, [(follow, "b")])
    assert cached == 0
    assert second == reference(follow)[:MAX_NEW]
    [(_, cached)] = drive(backend, [(follow, "a")])  # (the owner's own follow-up still hits)
    assert cached > 0


def test_under_slot_pressure_the_least_recently_used_entry_goes_first(tiny_dir: Path, reference) -> None:  # type: ignore[no-untyped-def]
    backend = backend_of(tiny_dir, slots=3)
    [(old, _)] = drive(backend, [(turn1(seed=0), "a")])  # kept in a free slot
    [(new, _)] = drive(backend, [(turn1(seed=4), "a")])  # kept too (the older entry moves out of its way)
    assert backend.cache_stats().prefix_entries == 2
    # Two requests of another key take two of the three slots: one entry has to go, the older one.
    drive(backend, [(PROMPTS[0], "b"), (PROMPTS[1], "b")])
    follow_new, follow_old = turn2(backend.detokenize(new), seed=4), turn2(backend.detokenize(old), seed=0)
    [(tokens, cached)] = drive(backend, [(follow_new, "a")])
    assert cached >= prompt_length(backend, turn1()) and tokens == reference(follow_new)[:MAX_NEW]
    [(tokens, cached)] = drive(backend, [(follow_old, "a")])
    assert cached <= first_audio_position(backend, follow_old)  # evicted: only the template is still shared
    assert tokens == reference(follow_old)[:MAX_NEW]


def test_with_every_slot_running_the_entries_are_evicted_and_answers_stay_exact(tiny_dir: Path, reference) -> None:  # type: ignore[no-untyped-def]
    backend = backend_of(tiny_dir, slots=2)
    [(first, _)] = drive(backend, [(turn1(), "a")])
    got = drive(backend, [(PROMPTS[2], "b"), (PROMPTS[4], "b")])
    assert [t for t, _ in got] == [reference(m)[:MAX_NEW] for m in (PROMPTS[2], PROMPTS[4])]
    follow = turn2(backend.detokenize(first))
    [(second, cached)] = drive(backend, [(follow, "a")])
    assert cached == 0 and second == reference(follow)[:MAX_NEW]


def test_with_no_room_to_move_an_entry_a_partial_match_takes_its_slot(tiny_dir: Path, reference) -> None:  # type: ignore[no-untyped-def]
    backend = backend_of(tiny_dir, slots=1)  # one slot: the entry sits where the follow-up must go
    [(first, _)] = drive(backend, [(turn1(), "a")])
    follow = turn2(backend.detokenize(first))
    held = [*backend.prepare(turn1()).token_ids, *first[:-1]]
    [(second, cached)] = drive(backend, [(follow, "a")])
    assert cached == shared_prefix(held, backend.prepare(follow).token_ids) >= prompt_length(backend, turn1())
    assert second == reference(follow)[:MAX_NEW]


def test_slots_kept_for_the_cache_survive_a_full_batch(tiny_dir: Path, reference) -> None:  # type: ignore[no-untyped-def]
    backend = backend_of(tiny_dir, slots=2, kept=1)  # --prefix-cache-slots 1
    [(first, _)] = drive(backend, [(turn1(), "a")])
    drive(backend, [(PROMPTS[2], "b"), (PROMPTS[4], "b")])  # every running slot taken: the entry moves out of the way
    follow = turn2(backend.detokenize(first))
    [(second, cached)] = drive(backend, [(follow, "a")])
    assert cached >= prompt_length(backend, turn1()) and second == reference(follow)[:MAX_NEW]


def test_the_opt_out_reuses_nothing(tiny_dir: Path, reference) -> None:  # type: ignore[no-untyped-def]
    backend = backend_of(tiny_dir, prefix_caching=False)
    [(first, _)] = drive(backend, [(turn1(), "a")])
    follow = turn2(backend.detokenize(first))
    [(second, cached)] = drive(backend, [(follow, "a")])
    assert cached == 0 and second == reference(follow)[:MAX_NEW]
    assert backend.cache_stats().prefix_entries == 0 and backend.cache_stats().prefix_hits == 0


def test_a_clip_seen_before_skips_the_encoder(tiny_dir: Path, reference) -> None:  # type: ignore[no-untyped-def]
    backend = backend_of(tiny_dir, prefix_caching=False)  # no prefix to reuse: only the encoder cache can help
    drive(backend, [(turn1(), "a")])
    stats = backend.cache_stats()
    assert stats.encoder_entries == 1 and stats.encoder_bytes > 0
    again = ask(3.0, "Another question about the same clip.", 0)
    [(tokens, _)] = drive(backend, [(again, "b")])
    assert backend.cache_stats().encoder_hits == stats.encoder_hits + 1
    assert tokens == reference(again)[:MAX_NEW]


async def answer(engine: Any, messages: Sequence[Message], salt: str) -> tuple[list[int], str, Usage]:
    """Tokens, text and final usage of a greedy answer through an engine's generate()."""
    prompt = await engine.prepare(messages)
    chunks: list[GenerationChunk] = [
        c async for c in engine.generate(prompt, engine.resolve(GREEDY, prompt), cache_salt=salt)
    ]
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks), chunks[-1].usage


async def test_the_engine_reports_reused_prompt_tokens_in_usage(tiny_dir: Path, reference) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(backend_of(tiny_dir), max_batch_size=4)
    engine.start()
    try:
        _, text, usage = await answer(engine, turn1(), "a")
        assert usage.cached_tokens == 0
        follow = turn2(text)
        second, _, usage = await answer(engine, follow, "a")
        assert second == reference(follow)[:MAX_NEW]
        assert usage.cached_tokens >= usage.audio_tokens > 0  # the audio was reused; it is still billed
        assert engine.stats.cache.prefix_hits == 1
    finally:
        engine.stop()


@pytest.fixture(scope="module")
async def remote(tiny_dir: Path) -> AsyncIterator[RemoteEngine]:
    engine = RemoteEngine(EngineOptions(path=str(tiny_dir), max_batch_size=4, max_queue=16))
    await engine.open()
    yield engine
    await engine.aclose()


async def test_through_the_engine_process_a_follow_up_hits_and_stays_exact(remote, reference) -> None:  # type: ignore[no-untyped-def]
    _, text, _ = await answer(remote, turn1(), "a")
    follow = turn2(text)
    other_key, own_key = await asyncio.gather(answer(remote, follow, "b"), answer(remote, follow, "a"))
    assert other_key[0] == own_key[0] == reference(follow)[:MAX_NEW]
    assert other_key[2].cached_tokens == 0
    assert own_key[2].cached_tokens >= own_key[2].audio_tokens > 0
    assert remote.stats.cache.prefix_hits >= 1  # the counters cross from the engine process
