"""Engine benchmark: Ting's continuous batching against the reference sequential generate() loop.

Both serve the same requests, on the same weights, in the same run: C clients, each sending requests back to
back (closed loop); every request is one audio clip plus a question, answered greedily with exactly
`--max-tokens` tokens (end-of-sequence ignored, so both do the same work). The reference handles one request
at a time with transformers' `model.generate()` (its first-token time taken from a logits-processor hook).

Prints, per concurrency: output tokens/s and time to first token (p50, p95) for each, and Ting's ratio to
the reference. Results also go to bench/out/engine-<model>-<device>.json.

  python bench/engine.py --model tiny
  python bench/engine.py --model real-width                       # hidden 4096, real vocab, 2 layers
  python bench/engine.py --model 7b --device cuda --concurrency 1,16,64 --audio-seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from ting.engine import (
    Engine,
    qwen2_audio,
    tiny,
)
from ting.types import AudioClip, AudioPart, Message, SamplingParams, TextPart

OUT = Path(__file__).resolve().parent / "out"
QUESTIONS = [
    "What is said in this audio?",
    "Describe the sound.",
    "What language is spoken?",
    "Is the speaker happy or sad?",
    "Transcribe the speech.",
    "What instruments can you hear?",
]


@dataclass
class Result:
    system: str
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    ttft_s: list[float]
    decode_tok_s: list[float]  # per request, tokens after the first / time after the first
    peak_memory_gib: float = 0.0  # CPU: the process's peak RSS; CUDA: peak memory allocated by torch

    @property
    def throughput(self) -> float:
        return self.output_tokens / self.wall_s

    def pct(self, q: float) -> float:
        return float(np.percentile(self.ttft_s, q))


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def make_request(i: int, seconds: float) -> tuple[Message, ...]:
    rng = np.random.default_rng(i)
    n = int(seconds * 16000)
    samples = (0.3 * np.sin(np.arange(n) * 0.02 * (1 + i % 5)) + 0.05 * rng.standard_normal(n)).astype(np.float32)
    clip = AudioClip(samples=samples, duration_s=seconds, truncated=False, container="wav", codec="pcm_s16le")
    return (Message("user", (AudioPart("bench", clip), TextPart(QUESTIONS[i % len(QUESTIONS)]))),)


class Reference:
    """One request at a time through transformers' generate(), as a naive server would."""

    def __init__(self, backend: qwen2_audio.Qwen2AudioBackend) -> None:
        self.backend = backend
        self.lock = threading.Lock()

    def run(self, messages: tuple[Message, ...], max_tokens: int, submitted: float) -> tuple[float, float, int]:
        prompt = self.backend.prepare(messages)
        inputs = {"input_ids": torch.tensor([prompt.token_ids]), **(prompt.inputs or {})}
        inputs = {k: v.to(self.backend.device) for k, v in inputs.items()}
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        first: list[float] = []

        def mark(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if not first:
                first.append(time.perf_counter())
            return scores

        with self.lock, torch.inference_mode():
            out = self.backend.model.generate(
                **inputs,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                repetition_penalty=1.0,
                logits_processor=[mark],
            )
            if self.backend.device.type == "cuda":
                torch.cuda.synchronize()
            done = time.perf_counter()
        produced = out.shape[1] - inputs["input_ids"].shape[1]
        return first[0] - submitted, done - first[0], produced


async def drive(
    system: str,
    concurrency: int,
    per_client: int,
    seconds: float,
    max_tokens: int,
    engine: Engine | None,
    reference: Reference | None,
) -> Result:
    ttft: list[float] = []
    decode: list[float] = []
    total = 0

    async def one(i: int) -> None:
        nonlocal total
        messages = make_request(i, seconds)
        submitted = time.perf_counter()
        if reference is not None:
            first_s, rest_s, produced = await asyncio.to_thread(reference.run, messages, max_tokens, submitted)
        else:
            assert engine is not None
            prompt = await engine.prepare(messages)
            sampling = engine.resolve(
                SamplingParams(temperature=0.0, repetition_penalty=1.0, max_tokens=max_tokens, ignore_eos=True), prompt
            )
            produced, first_at = 0, None
            async for chunk in engine.generate(prompt, sampling):
                produced += len(chunk.token_ids)
                first_at = first_at or time.perf_counter()
            first_s, rest_s = first_at - submitted, time.perf_counter() - first_at
        ttft.append(first_s)
        if produced > 1 and rest_s > 0:
            decode.append((produced - 1) / rest_s)
        total += produced

    async def client(c: int) -> None:
        for k in range(per_client):
            await one(c * per_client + k)

    device = (reference.backend if reference is not None else engine.backend).device  # type: ignore[union-attr]
    reset_peak_memory(device)
    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    wall = time.perf_counter() - started
    return Result(system, concurrency, concurrency * per_client, total, wall, ttft, decode, peak_memory_gib(device))


def prepare_model(name: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"model-{name}"
    if not (path / "config.json").exists():
        tiny.build(path, name)
    return path


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | real-width | 7b | a checkpoint directory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--per-client", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--audio-seconds", type=float, default=5.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--skip-reference-above",
        type=int,
        default=1_000_000,
        help="skip the (slow) reference at concurrency above this; its per-request cost is flat",
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    preset = args.model in tiny.PRESETS
    path = prepare_model(args.model) if preset else Path(args.model)
    random_weights = preset and not tiny.PRESETS[args.model]["weights"]
    t0 = time.perf_counter()
    backend = qwen2_audio.load(
        str(path), device=args.device, dtype=args.dtype, random_weights=random_weights, max_batch_size=max(levels)
    )
    load_s = time.perf_counter() - t0
    info = backend.describe()
    print(
        f"# engine bench: {args.model} ({info['parameters'] / 1e6:.1f} M parameters, {info['dtype']}) on "
        f"{args.device}; {args.audio_seconds:g} s clips, {args.max_tokens} output tokens, "
        f"{args.per_client} requests per client; loaded in {load_s:.1f} s; "
        f"{'peak memory' if args.device.startswith('cuda') else 'RSS'} after loading "
        f"{peak_memory_gib(backend.device):.2f} GiB",
        flush=True,
    )
    engine = Engine(backend, max_batch_size=max(levels), max_queue=10_000)
    engine.start()
    reference = Reference(backend)
    await drive("warm-up", 1, 1, args.audio_seconds, 4, None, reference)
    await drive("warm-up", 1, 1, args.audio_seconds, 4, engine, None)
    rows = []
    for c in levels:
        ref = None
        if c <= args.skip_reference_above:
            ref = await drive("reference", c, args.per_client, args.audio_seconds, args.max_tokens, None, reference)
        ting = await drive("ting", c, args.per_client, args.audio_seconds, args.max_tokens, engine, None)
        rows.append((c, ref, ting))
        r = ref
        print(
            f"C={c:>3}: reference {r.throughput if r else float('nan'):8.2f} tok/s, TTFT p50 "
            f"{r.pct(50) if r else float('nan'):7.2f} s | ting {ting.throughput:8.2f} tok/s, TTFT p50 "
            f"{ting.pct(50):7.2f} s | x{ting.throughput / r.throughput if r else float('nan'):.2f}",
            flush=True,
        )
    engine.stop()
    print()
    print(
        "| concurrency | reference tok/s | Ting tok/s | throughput × | reference TTFT p50 / p95 (s) | "
        "Ting TTFT p50 / p95 (s) | TTFT p50 ratio | Ting decode tok/s per stream | "
        "peak memory GiB reference / Ting |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for c, ref, ting in rows:
        if ref is not None:
            ratio = ting.throughput / ref.throughput
            print(
                f"| {c} | {ref.throughput:.2f} | {ting.throughput:.2f} | **{ratio:.2f}** | "
                f"{ref.pct(50):.2f} / {ref.pct(95):.2f} | {ting.pct(50):.2f} / {ting.pct(95):.2f} | "
                f"{ting.pct(50) / ref.pct(50):.2f} | {statistics.median(ting.decode_tok_s):.1f} | "
                f"{ref.peak_memory_gib:.2f} / {ting.peak_memory_gib:.2f} |"
            )
        else:
            print(
                f"| {c} | (skipped) | {ting.throughput:.2f} | – | – | {ting.pct(50):.2f} / {ting.pct(95):.2f} | – | "
                f"{statistics.median(ting.decode_tok_s):.1f} | – / {ting.peak_memory_gib:.2f} |"
            )
    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if args.device.startswith("cuda"):
        machine = torch.cuda.get_device_name() + f", torch {torch.__version__}"
    record = {
        "model": args.model,
        "device": args.device,
        "machine": machine,
        "args": vars(args),
        "info": info,
        "rows": [{"concurrency": c, "reference": asdict(r) if r else None, "ting": asdict(t)} for c, r, t in rows],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"engine-{args.model}-{args.device.replace(':', '')}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
