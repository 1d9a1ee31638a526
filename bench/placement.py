"""What the engine-process split costs, piece by piece: the measurements behind where each piece lives.

Per piece, the median over repeats on this machine (CPU; single thread of Python):

* prepare: chat template + tokenizer + log-mel features of one clip (runs in the server process, on a thread);
* detokenize: the incremental decoder's work for one token (runs in the engine process, per running request
  per step), against the time of a decoding step of 16 rows of the same model;
* the wire: encoding + decoding one request (features as one raw buffer) and one step message of 16 rows;
* base64: decoding a data: URI of the largest allowed size (10 MiB), on the event loop.

  python bench/placement.py [--model tiny|real-width]
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import make_request, prepare_model  # bench/engine.py
from ting.audio.sources import parse_data_uri
from ting.engine import Engine, wire
from ting.engine.detokenize import IncrementalDecoder
from ting.engine.qwen2_audio import load, load_inputs
from ting.types import GenerationChunk, SamplingParams, Usage


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    path = prepare_model(args.model)
    inputs = load_inputs(path)
    print(f"# placement: {args.model}")
    for seconds in (2.6, 5.0, 30.0):
        messages = make_request(0, seconds)
        ms = median_ms(lambda m=messages: inputs.prepare(m), args.repeats)
        prompt = inputs.prepare(messages)
        frames = wire.encode_add(1, "r", prompt, _sampling())
        size = sum(len(memoryview(f)) for f in frames)
        enc = median_ms(lambda p=prompt: wire.encode_add(1, "r", p, _sampling()), args.repeats)
        dec = median_ms(lambda f=frames: wire.decode_add(f), args.repeats)
        full = prompt.inputs["input_features"].numel() * 4
        print(
            f"prepare {seconds:4.1f} s clip: {ms:6.2f} ms | ADD message {size / 1024:7.1f} KiB (full window "
            f"{full / 1024:.0f} KiB), encode {enc:.3f} ms, decode {dec:.3f} ms"
        )
    backend = load(str(path), random_weights=args.model != "tiny", max_batch_size=16)
    text = "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。" * 8
    ids = backend.tokenizer.encode(text)[:256]

    def detokenize_all() -> None:
        d = IncrementalDecoder(backend.detokenize, ("</stop>",))
        for t in ids:
            d.push(t)

    per_token_us = median_ms(detokenize_all, max(3, args.repeats // 4)) * 1000 / len(ids)
    engine = Engine(backend, max_batch_size=16)
    engine.start()
    import asyncio

    async def sixteen() -> float:
        prompts = [await engine.prepare(make_request(i, 2.6)) for i in range(16)]
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, repetition_penalty=1.0)

        async def one(p):  # type: ignore[no-untyped-def]
            async for _ in engine.generate(p, engine.resolve(params, p)):
                pass

        steps0, t = engine.stats.steps, time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        return (time.perf_counter() - t) * 1000 / max(1, engine.stats.steps - steps0)

    step_ms = asyncio.run(sixteen())
    engine.stop()
    chunk = GenerationChunk(text="狐狸", token_ids=(1234,), finish_reason=None, usage=Usage(30, 65, 12))
    message = [wire.STEP, wire.pack([[16, 0, 10, 100, 0], [wire.encode_chunk(i, chunk) for i in range(16)], []])]
    step_enc = median_ms(
        lambda: wire.pack([[16, 0, 10, 100, 0], [wire.encode_chunk(i, chunk) for i in range(16)], []]),
        args.repeats * 10,
    )
    step_dec = median_ms(lambda: [wire.decode_chunk(c) for c in wire.unpack(message[1])[1]], args.repeats * 10)
    print(
        f"detokenize: {per_token_us:.1f} µs per token -> {16 * per_token_us / 1000:.2f} ms per step of 16 rows; "
        f"a decoding step of 16 rows (prefills included): {step_ms:.1f} ms"
    )
    print(
        f"STEP message of 16 rows: {len(message[1])} bytes, encode {step_enc * 1000:.0f} µs, "
        f"decode {step_dec * 1000:.0f} µs"
    )
    payload = np.random.default_rng(0).integers(0, 256, 10 * 2**20 * 3 // 4, dtype=np.uint8).tobytes()
    uri = "data:audio/wav;base64," + base64.b64encode(payload).decode()
    b64 = median_ms(lambda: parse_data_uri(uri, max_bytes=11 * 2**20), max(3, args.repeats // 4))
    print(f"base64 data: URI of {len(uri) / 2**20:.1f} MiB: {b64:.1f} ms")


def _sampling():  # type: ignore[no-untyped-def]
    from ting.engine.backend import Sampling

    return Sampling(
        max_tokens=48,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        presence_penalty=0,
        frequency_penalty=0,
        seed=1,
        stop=(),
        stop_token_ids=frozenset(),
        ignore_eos=False,
    )


if __name__ == "__main__":
    main()
