"""Follow-up turns: time to first token of turns 2 and 3 with prefix reuse against the same turns without it.

Every turn of a chat resends the whole history (the SDK's multi-turn pattern): turn 1 asks about a clip, turn 2
asks a text-only follow-up, turn 3 another. Three modes run on the same backend, in the same run, on the same
prompts (the history's answers are the first mode's greedy answers):

  none     no reuse: every turn encodes the audio and prefills the whole history
  encoder  the audio-encoder cache only (what is left when a conversation's keys and values were evicted)
  prefix   prefix reuse (and the encoder cache): a follow-up prefills only what is new

Then a mixed load: C clients, each sends a first question about a clip of its own and then a follow-up about it
(half the requests are follow-ups), closed loop; output tokens/s and TTFT with and without reuse.

  python bench/followup.py --model tiny
  python bench/followup.py --model real-width --max-tokens 4 --load-audio-seconds 5

Greedy answers are checked equal across the modes (token for token). Results also go to
bench/out/followup-<model>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import OUT, prepare_model  # bench/engine.py
from ting.engine import Engine, qwen2_audio, tiny
from ting.types import AudioClip, AudioPart, Message, SamplingParams, TextPart

QUESTIONS = ["What is said in this audio?", "And who is speaking?", "What language is it in?"]
MODES = ("none", "encoder", "prefix")


def make_clip(i: int, seconds: float) -> AudioClip:
    rng = np.random.default_rng(1000 + i)
    n = int(seconds * 16000)
    samples = (0.3 * np.sin(np.arange(n) * 0.015 * (1 + i % 7)) + 0.05 * rng.standard_normal(n)).astype(np.float32)
    return AudioClip(samples=samples, duration_s=seconds, truncated=False, container="wav", codec="pcm_s16le")


def history(clip: AudioClip, answers: list[str], turn: int) -> tuple[Message, ...]:
    """Turn `turn` (0-based) of a conversation: the clip and the first question, then each answer and question."""
    messages = [Message("user", (AudioPart("bench", clip), TextPart(QUESTIONS[0])))]
    for k in range(turn):
        messages.append(Message("assistant", (TextPart(answers[k]),)))
        messages.append(Message("user", (TextPart(QUESTIONS[k + 1]),)))
    return tuple(messages)


def set_mode(backend: qwen2_audio.Qwen2AudioBackend, mode: str, encoder_cache_bytes: int) -> None:
    backend.clear_caches()
    backend.prefix_caching = mode == "prefix"
    backend.encoder_cache_bytes = 0 if mode == "none" else encoder_cache_bytes


async def ask(engine: Engine, messages: tuple[Message, ...], max_tokens: int, salt: str) -> dict[str, Any]:
    """One request: TTFT, the answer (tokens and text), the prompt tokens it reused."""
    submitted = time.perf_counter()
    prompt = await engine.prepare(messages)
    prepared = time.perf_counter()
    params = SamplingParams(temperature=0.0, repetition_penalty=1.0, max_tokens=max_tokens, ignore_eos=True)
    tokens: list[int] = []
    text, first_at, cached = "", 0.0, 0
    async for chunk in engine.generate(prompt, engine.resolve(params, prompt), cache_salt=salt):
        first_at = first_at or time.perf_counter()
        tokens.extend(chunk.token_ids)
        text += chunk.text
        cached = chunk.usage.cached_tokens
    done = time.perf_counter()
    return {
        "ttft_s": first_at - submitted,  # prepare (template, tokenizer, log-mel features) included
        "engine_ttft_s": first_at - prepared,
        "total_s": done - submitted,
        "tokens": tokens,
        "text": text,
        "prompt_tokens": len(prompt.token_ids),
        "cached_tokens": cached,
    }


async def conversations(engine: Engine, args: argparse.Namespace, encoder_bytes: int) -> dict[str, Any]:
    backend = engine.backend
    assert isinstance(backend, qwen2_audio.Qwen2AudioBackend)
    clips = [make_clip(i, args.audio_seconds) for i in range(args.conversations)]
    answers: list[list[str]] = [[] for _ in clips]  # the first mode's answers make every mode's history
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    for mode in MODES:
        set_mode(backend, mode, encoder_bytes)
        runs[mode] = []
        for c, clip in enumerate(clips):
            turns = []
            for turn in range(3):
                r = await ask(engine, history(clip, answers[c], turn), args.max_tokens, salt=f"user{c}")
                if mode == MODES[0] and turn < 2:
                    answers[c].append(r["text"])
                turns.append(r)
                print(
                    f"  {mode:8} conversation {c} turn {turn + 1}: TTFT {r['ttft_s']:7.3f} s "
                    f"(engine {r['engine_ttft_s']:7.3f} s), "
                    f"{r['prompt_tokens']} prompt tokens, {r['cached_tokens']} reused",
                    flush=True,
                )
            runs[mode].append(turns)
    same = all(
        runs[m][c][t]["tokens"] == runs["none"][c][t]["tokens"]
        for m in MODES
        for c in range(len(clips))
        for t in range(3)
    )
    return {"runs": runs, "same_tokens": same}


async def mixed_load(engine: Engine, args: argparse.Namespace, mode: str, encoder_bytes: int) -> dict[str, Any]:
    """C clients, each: a first question about its own clip, then a follow-up (half the requests)."""
    backend = engine.backend
    assert isinstance(backend, qwen2_audio.Qwen2AudioBackend)
    set_mode(backend, mode, encoder_bytes)
    ttft: dict[str, list[float]] = {"first": [], "follow-up": []}
    total = 0

    async def client(c: int) -> None:
        nonlocal total
        clip = make_clip(100 + c, args.load_audio_seconds)
        first = await ask(engine, history(clip, [], 0), args.max_tokens, salt=f"load{c}")
        second = await ask(engine, history(clip, [first["text"]], 1), args.max_tokens, salt=f"load{c}")
        ttft["first"].append(first["ttft_s"])
        ttft["follow-up"].append(second["ttft_s"])
        total += len(first["tokens"]) + len(second["tokens"])

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(args.load_concurrency)))
    wall = time.perf_counter() - started
    return {
        "mode": mode,
        "output_tokens": total,
        "wall_s": wall,
        "tok_s": total / wall,
        "ttft_first_p50_s": statistics.median(ttft["first"]),
        "ttft_follow_up_p50_s": statistics.median(ttft["follow-up"]),
        "cache": engine.stats.cache.__dict__,
    }


def median_ttft(runs: list[list[dict[str, Any]]], turn: int, key: str = "ttft_s") -> float:
    return statistics.median(r[turn][key] for r in runs)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | real-width | a checkpoint directory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--audio-seconds", type=float, default=30.0)
    parser.add_argument("--conversations", type=int, default=2, help="three-turn conversations per mode")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--load-concurrency", type=int, default=16, help="0: no mixed load")
    parser.add_argument("--load-audio-seconds", type=float, default=30.0)
    parser.add_argument("--encoder-cache-mib", type=int, default=256)
    parser.add_argument("--prefix-cache-slots", type=int, default=0, help="KV rows kept for finished sequences only")
    args = parser.parse_args()
    preset = args.model in tiny.PRESETS
    path = prepare_model(args.model) if preset else Path(args.model)
    random_weights = preset and not tiny.PRESETS[args.model]["weights"]
    slots = max(16, args.load_concurrency)
    backend = qwen2_audio.load(
        str(path),
        device=args.device,
        random_weights=random_weights,
        max_batch_size=slots,
        prefix_cache_slots=args.prefix_cache_slots,
    )
    encoder_bytes = args.encoder_cache_mib * 2**20
    engine = Engine(backend, max_batch_size=slots, max_queue=10_000)
    engine.start()
    print(
        f"# follow-up bench: {args.model} on {args.device} ({platform.machine()}, {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.1f}); {args.audio_seconds:g} s clip, {args.max_tokens} output tokens per turn, "
        f"{args.conversations} conversations per mode; {slots} slots + {args.prefix_cache_slots} kept for the cache",
        flush=True,
    )
    set_mode(backend, "none", encoder_bytes)
    await ask(engine, history(make_clip(999, 2.0), [], 0), 2, salt="warm-up")  # warm-up
    talk = await conversations(engine, args, encoder_bytes)
    loads = []
    if args.load_concurrency:
        for mode in ("none", "prefix"):
            print(f"  mixed load C={args.load_concurrency}, {mode} ...", flush=True)
            loads.append(await mixed_load(engine, args, mode, encoder_bytes))
    engine.stop()
    runs = talk["runs"]
    print()
    print(f"greedy tokens equal across modes: {talk['same_tokens']}")
    print()
    print(
        "| turn | prompt tokens | reused tokens | TTFT no reuse (s) | TTFT encoder cache only (s) | "
        "TTFT prefix reuse (s) | prefix / no reuse | engine part: no reuse / prefix (s) | engine part ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for turn in range(3 if args.conversations else 0):
        none, enc, pre = (median_ttft(runs[m], turn) for m in MODES)
        e_none, e_pre = (median_ttft(runs[m], turn, "engine_ttft_s") for m in ("none", "prefix"))
        print(
            f"| {turn + 1} | {runs['none'][0][turn]['prompt_tokens']} | {runs['prefix'][0][turn]['cached_tokens']} | "
            f"{none:.3f} | {enc:.3f} | {pre:.3f} | **{pre / none:.2f}** | {e_none:.3f} / {e_pre:.3f} | "
            f"{e_pre / e_none:.2f} |"
        )
    if loads:
        print()
        print("| mixed load | output tok/s | TTFT p50 first question (s) | TTFT p50 follow-up (s) | wall (s) |")
        print("|---|---|---|---|---|")
        for r in loads:
            print(
                f"| C={args.load_concurrency}, {r['mode']} | {r['tok_s']:.2f} | {r['ttft_first_p50_s']:.2f} | "
                f"{r['ttft_follow_up_p50_s']:.2f} | {r['wall_s']:.1f} |"
            )
    OUT.mkdir(parents=True, exist_ok=True)
    for mode_runs in runs.values():
        for conversation in mode_runs:
            for r in conversation:
                r.pop("text")
    out = {"args": vars(args), "same_tokens": talk["same_tokens"], "conversations": runs, "mixed_load": loads}
    (OUT / f"followup-{Path(args.model).name}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
