"""Server benchmark: the same requests through the real HTTP server and through the in-process engine.

What the server costs on top of the engine. In one run, on the same weights: C clients each send requests back to
back (closed loop); every request is one clip (a WAV data: URI over HTTP, the same samples in-process) and a
question, answered greedily with exactly `--max-tokens` tokens (end-of-sequence ignored: `ignore_eos` in-process,
a backend wrapper in the server's engine process, so both do the same work). Systems:

  in-process    bench/engine.py's way: Engine.prepare / generate in this process (no HTTP, no audio decoding)
  http-stream   `ting serve` (the engine in its own process), DashScope SSE, a real HTTP client (aiohttp, as
                vLLM's benchmark uses; --client httpx for httpx)
  http-plain    the same server, non-streaming answers (TTFT: not seen by the client, so not shown)
  thread-*      with --before: `ting serve --no-engine-process` (the engine on a thread of the server process,
                as before the engine process existed), streaming and plain

Both kinds are loaded at once and measured in interleaved rounds (--rounds, default 3: in-process, then each
server, streaming and plain, in turn), so that the machine's drift falls on all of them alike. Prints output
tokens/s (all rounds' tokens over all rounds' time), TTFT p50/p95 and the HTTP/in-process ratio per concurrency.
Raw figures go to bench/out/server-<model>.json.

  python bench/server.py --model tiny --concurrency 1,4,16,64
  python bench/server.py --model real-width --concurrency 1,4,16 --per-client 1 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import QUESTIONS, make_request, prepare_model  # bench/engine.py
from ting.engine import Engine, qwen2_audio, tiny
from ting.types import AudioClip, AudioPart, Message, SamplingParams, TextPart

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
GENERATION = "/api/v1/services/aigc/multimodal-generation/generation"


def no_eos(backend: Any) -> Any:
    """Loaded into the server's engine process (TING_TEST_BACKEND_WRAPPER): never stop at end-of-sequence."""
    backend.eos_token_ids = frozenset()
    return backend


@dataclass
class Result:
    system: str
    concurrency: int
    requests: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU time (user + system) per process kind in the run
    steps: int = 0  # decoding steps the engine ran (the mean batch: output tokens / steps)

    def add(self, other: Result) -> None:
        self.requests += other.requests
        self.output_tokens += other.output_tokens
        self.wall_s += other.wall_s
        self.ttft_s += other.ttft_s
        self.steps += other.steps
        for k, v in other.cpu_s.items():
            self.cpu_s[k] = self.cpu_s.get(k, 0.0) + v

    @property
    def throughput(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else float("nan")

    def pct_ms(self, q: float) -> float:
        return float(np.percentile(self.ttft_s, q)) * 1000 if self.ttft_s else float("nan")


def wav_uri(samples: np.ndarray) -> str:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm)
    return "data:audio/wav;base64," + base64.b64encode(buffer.getvalue()).decode()


def requests_for(n: int, seconds: float, start: int = 0) -> list[tuple[str, tuple[Message, ...]]]:
    """n requests (clips `start`, `start + 1`, ...): the WAV data URI and, for in-process, the same samples as the
    server decodes them."""
    out = []
    for i in range(start, start + n):
        samples = make_request(i, seconds)[0].parts[0].clip.samples
        pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").astype(np.float32) / 32768.0
        pcm.setflags(write=False)  # read-only, as the server's decoded clips are: both may reuse features alike
        clip = AudioClip(samples=pcm, duration_s=seconds, truncated=False, container="wav", codec="pcm_s16le")
        out.append(
            (wav_uri(samples), (Message("user", (AudioPart("bench", clip), TextPart(QUESTIONS[i % len(QUESTIONS)]))),))
        )
    return out


async def closed_loop(concurrency: int, per_client: int, one) -> tuple[int, float, list[float]]:  # type: ignore[no-untyped-def]
    tokens: list[int] = []
    ttft: list[float] = []

    async def client(c: int) -> None:
        for k in range(per_client):
            produced, first_s = await one(c * per_client + k)
            tokens.append(produced)
            if first_s is not None:
                ttft.append(first_s)

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    return sum(tokens), time.perf_counter() - started, ttft


async def run_in_process(engine: Engine, reqs: list[Any], c: int, per_client: int, max_tokens: int) -> Result:
    params = SamplingParams(temperature=0.0, repetition_penalty=1.0, max_tokens=max_tokens, ignore_eos=True)

    async def one(i: int) -> tuple[int, float | None]:
        submitted = time.perf_counter()
        prompt = await engine.prepare(reqs[i % len(reqs)][1])
        produced, first = 0, None
        async for chunk in engine.generate(prompt, engine.resolve(params, prompt)):
            produced += len(chunk.token_ids)
            first = first or time.perf_counter() - submitted
        return produced, first

    tokens, wall, ttft = await closed_loop(c, per_client, one)
    return Result("in-process", c, c * per_client, tokens, wall, ttft)


def question_of(req: tuple[str, tuple[Message, ...]]) -> str:
    text = req[1][0].parts[1]
    assert isinstance(text, TextPart)
    return text.text


def dashscope_body(reqs: list[Any], i: int, max_tokens: int) -> dict[str, Any]:
    return {
        "model": "qwen-audio-turbo",
        "input": {
            "messages": [
                {
                    "role": "user",
                    "content": [{"audio": reqs[i % len(reqs)][0]}, {"text": question_of(reqs[i % len(reqs)])}],
                }
            ]
        },
        "parameters": {
            "max_tokens": max_tokens,
            "temperature": 0,
            "repetition_penalty": 1.0,
            "incremental_output": True,
        },
    }


def sse_usage(line: str, submitted: float, first: float | None) -> tuple[int | None, float | None]:
    """(output tokens so far, time to the first event) after one line of a DashScope event stream."""
    if line.startswith("event:error"):
        raise RuntimeError("the server sent an error event")
    if line.startswith("data:"):
        return json.loads(line[5:])["usage"]["output_tokens"], first or time.perf_counter() - submitted
    return None, first


async def run_http(
    url: str,
    system: str,
    reqs: list[Any],
    c: int,
    per_client: int,
    max_tokens: int,
    stream: bool,
    client_kind: str = "aiohttp",
) -> Result:
    """The requests through the server, with aiohttp (vLLM's benchmark client: the lightest on the shared cores)
    or httpx."""
    headers = {"Authorization": "Bearer bench", **({"X-DashScope-SSE": "enable"} if stream else {})}
    if client_kind == "httpx":
        limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

            async def one(i: int) -> tuple[int, float | None]:
                submitted, first, usage = time.perf_counter(), None, 0
                if not stream:
                    r = await client.post(GENERATION, json=dashscope_body(reqs, i, max_tokens), headers=headers)
                    r.raise_for_status()
                    return r.json()["usage"]["output_tokens"], None
                async with client.stream(
                    "POST", GENERATION, json=dashscope_body(reqs, i, max_tokens), headers=headers
                ) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        seen, first = sse_usage(line, submitted, first)
                        usage = usage if seen is None else seen
                return usage, first

            tokens, wall, ttft = await closed_loop(c, per_client, one)
        return Result(system, c, c * per_client, tokens, wall, ttft)

    import aiohttp

    connector = aiohttp.TCPConnector(limit=c + 4)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def one_aiohttp(i: int) -> tuple[int, float | None]:
            submitted, first, usage = time.perf_counter(), None, 0
            async with session.post(GENERATION, json=dashscope_body(reqs, i, max_tokens), headers=headers) as r:
                r.raise_for_status()
                if not stream:
                    return int((await r.json())["usage"]["output_tokens"]), None
                async for raw in r.content:
                    seen, first = sse_usage(raw.decode().rstrip("\n"), submitted, first)
                    usage = usage if seen is None else seen
            return usage, first

        tokens, wall, ttft = await closed_loop(c, per_client, one_aiohttp)
    return Result(system, c, c * per_client, tokens, wall, ttft)


def cpu_seconds(server_pid: int | None) -> dict[str, float]:
    """CPU seconds used so far by this process (the client, or the in-process engine) and, for a server, by its
    process, its engine process and its audio decoders."""
    import psutil

    def used(p: psutil.Process) -> float:
        t = p.cpu_times()
        return float(t.user + t.system)

    out = {"bench": used(psutil.Process())}
    if server_pid is not None:
        server = psutil.Process(server_pid)
        out["server"] = used(server)
        for child in server.children(recursive=True):
            kind = "engine" if "ting.engine.core" in " ".join(child.cmdline()) else "decoders"
            out[kind] = out.get(kind, 0.0) + used(child)
    return out


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`ting serve` on a loopback port, its engine never stopping at end-of-sequence."""

    def __init__(
        self, path: Path, home: Path, *, dummy: bool, slots: int, engine_process: bool, threads: int = 0
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "TING_TEST_BACKEND_WRAPPER": "server:no_eos",
            "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
        }
        args = [
            sys.executable,
            "-m",
            "ting",
            "serve",
            "--model",
            str(path),
            "--port",
            str(self.port),
            "--home",
            str(home),
            "--max-batch-size",
            str(slots),
            "--max-queue",
            "10000",
            "--log-level",
            "warning",
            "--engine-process" if engine_process else "--no-engine-process",
            "--engine-threads",
            str(threads),
        ]
        if dummy:
            args += ["--load-format", "dummy"]
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL)

    def wait_ready(self, timeout_s: float = 1800) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"ting serve exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("ting serve did not become ready")

    def steps(self) -> int:
        return int(httpx.get(self.url + "/health", timeout=30).json()["steps"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


async def warm_up_http(url: str, reqs: list[Any]) -> None:
    await run_http(url, "warm-up", reqs, 2, 1, 4, stream=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | real-width | a checkpoint directory")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--per-client", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--audio-seconds", type=float, default=2.6)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument(
        "--engine-threads",
        type=int,
        default=1,
        help="torch threads of the engine, in-process and in the server alike (ting serve --engine-threads); "
        "1: what `ting serve` uses with the model on a GPU, the setting the tiny model stands in for; 0: every core",
    )
    parser.add_argument(
        "--client",
        choices=("aiohttp", "httpx"),
        default="aiohttp",
        help="the benchmark's HTTP client; it runs on the same cores as the server (aiohttp: about half httpx's CPU)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per concurrency, each system in turn within a round"
    )
    parser.add_argument(
        "--before",
        action="store_true",
        help="also measure `ting serve --no-engine-process` (the engine on a thread of the server)",
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    slots = max(levels)
    preset = args.model in tiny.PRESETS
    path = prepare_model(args.model) if preset else Path(args.model)
    dummy = preset and not tiny.PRESETS[args.model]["weights"]
    reqs = requests_for(2, args.audio_seconds, start=10**6)  # for the warm-ups
    results: dict[tuple[str, int], Result] = {}
    print(
        f"# server bench: {args.model}; {args.audio_seconds:g} s clips, {args.max_tokens} output tokens, "
        f"{args.per_client} requests per client, engine threads {args.engine_threads or 'auto'}",
        flush=True,
    )

    backend = qwen2_audio.load(str(path), random_weights=dummy, max_batch_size=slots)
    engine = Engine(backend, max_batch_size=slots, max_queue=10_000)
    threads = engine.use_threads(args.engine_threads)
    engine.start()
    asyncio.run(run_in_process(engine, reqs, 2, 1, 4))  # warm-up: a prefill and batched steps

    def measure(system: str, c: int, run: Any, pid: int | None, steps: Any) -> None:
        """One round of one system at one concurrency, added to the system's totals."""
        before, steps_before = cpu_seconds(pid), steps()
        r = asyncio.run(run)
        r.cpu_s, r.steps = cpu_used(before, cpu_seconds(pid)), steps() - steps_before
        total = results.setdefault((system, c), Result(system, c))
        total.add(r)
        print(f"{system} C={c}: {r.throughput:.1f} tok/s, TTFT p50 {r.pct_ms(50):.0f} ms", flush=True)

    servers = [("http", True)] + ([("thread", False)] if args.before else [])
    running: list[tuple[str, Server]] = []
    with tempfile.TemporaryDirectory(prefix="ting-bench-") as home:
        try:
            for prefix, engine_process in servers:
                server = Server(
                    path, Path(home) / prefix, dummy=dummy, slots=slots, engine_process=engine_process, threads=threads
                )
                running.append((prefix, server))
                server.wait_ready()
                asyncio.run(warm_up_http(server.url, reqs))
            # Rounds interleave the systems, so that the machine's drift (a shared VM's speed wanders by tens of
            # per cent over minutes) falls on all of them alike.
            # Every request of the run has a clip of its own (the same request for every system): no round reuses
            # another's audio, features or prompt (the caches would make later rounds follow-up turns).
            clips = 0
            for c in levels:
                for _ in range(args.rounds):
                    reqs = requests_for(c * args.per_client, args.audio_seconds, start=clips)
                    clips += len(reqs)
                    work = run_in_process(engine, reqs, c, args.per_client, args.max_tokens)
                    measure("in-process", c, work, None, lambda: engine.stats.steps)
                    for prefix, server in running:
                        for stream in (True, False):
                            system = f"{prefix}-{'stream' if stream else 'plain'}"
                            work = run_http(
                                server.url, system, reqs, c, args.per_client, args.max_tokens, stream, args.client
                            )
                            measure(system, c, work, server.proc.pid, server.steps)
        finally:
            for _, server in running:
                server.stop()
            engine.stop()
    print_table(results, levels, [p for p, _ in servers])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"server-{args.model}.json").write_text(
        json.dumps({"args": vars(args), "results": [asdict(r) for r in results.values()]}, indent=1)
    )


def print_table(results: dict[tuple[str, int], Result], levels: list[int], prefixes: list[str]) -> None:
    print()
    head = "| C | in-process tok/s | in-process TTFT p50 / p95 (ms) |"
    rule = "|---|---|---|"
    for p in prefixes:
        head += (
            f" {p}-stream tok/s (ratio) | {p}-stream TTFT p50 / p95 (ms) | added TTFT p50 (ms) | "
            f"{p}-plain tok/s (ratio) |"
        )
        rule += "---|---|---|---|"
    print(head)
    print(rule)
    for c in levels:
        base = results["in-process", c]
        row = f"| {c} | {base.throughput:.1f} | {base.pct_ms(50):.0f} / {base.pct_ms(95):.0f} |"
        for p in prefixes:
            s, n = results[f"{p}-stream", c], results[f"{p}-plain", c]
            row += (
                f" {s.throughput:.1f} (**{s.throughput / base.throughput:.2f}**) | {s.pct_ms(50):.0f} / "
                f"{s.pct_ms(95):.0f} | {s.pct_ms(50) - base.pct_ms(50):.0f} | {n.throughput:.1f} "
                f"({n.throughput / base.throughput:.2f}) |"
            )
        print(row)
    print()
    print("CPU ms per request (user + system), by process: where the two cores went")
    print()
    print(
        "| system | C | bench (client / in-process engine) | server | engine process | decoders | total | mean batch |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (system, c), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        per = {k: 1000 * v / r.requests for k, v in r.cpu_s.items()}
        cells = " | ".join(f"{per[k]:.0f}" if k in per else "" for k in ("bench", "server", "engine", "decoders"))
        batch = r.output_tokens / r.steps if r.steps else float("nan")
        print(f"| {system} | {c} | {cells} | {sum(per.values()):.0f} | {batch:.1f} |")


if __name__ == "__main__":
    main()
