"""Hostile load benchmark: how ordinary requests fare while hostile ones hit the same server.

A real `python -m ting serve --model tiny` runs on a loopback port with a temporary home. An ordinary request is a
DashScope chat about a 1 s clip (greedy, 4 tokens). Its latency is measured, one request at a time, on the idle
server, then while each hostile load runs (each load in a process of its own, so that building its requests does
not slow the measuring client):

  huge prompts     8 clients sending 3 MiB texts (DashScope and OpenAI) back to back
  long stop lists  8 clients sending 200,000 stop strings
  uploads          4 clients posting 20 MiB files to the upload host with a forged policy (no credentials)
  decode bombs     4 clients posting 2 h Opus, 2 h MP3 and a 25 MiB WAV of silence (52 min) to transcriptions
  idle sockets     2,000 connections that send nothing

The table gives each load's p50 and p99 next to the idle server's and their ratio (target: p99 within 2x of idle).
Everything is bounded: request counts, phase length and the whole run stop by themselves; loopback only.

  python bench/hostile.py                         # prints a Markdown table; bench/out/hostile.json keeps it
  python bench/hostile.py --requests 20 --loads huge_prompts,stop_lists
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests import corpus as C  # noqa: E402

OUT = ROOT / "bench" / "out"
GENERATION = "/api/v1/services/aigc/multimodal-generation/generation"
OPENAI_CHAT = "/v1/chat/completions"
TRANSCRIPTIONS = "/v1/audio/transcriptions"
UPLOAD_HOST = "/api/v1/uploads/oss"
AUTH = {"Authorization": "Bearer sk-bench"}
JSON = {**AUTH, "Content-Type": "application/json"}
LOADS = ("huge_prompts", "stop_lists", "uploads", "decode_bombs", "idle_sockets")
TARGET_RATIO = 2.0


# --- the server ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`python -m ting serve --model tiny` on a loopback port, with a home of its own."""

    def __init__(self, home: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        self.log = (home / "server.log").open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ting",
                "serve",
                "--model",
                "tiny",
                "--home",
                str(home / "home"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}); see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the server did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()

    def rss_mib(self) -> float:
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")


# --- ordinary requests -----------------------------------------------------------------------------------------


def ordinary_body(clip: bytes) -> dict[str, Any]:
    audio = "data:;base64," + base64.b64encode(clip).decode()
    return {
        "model": "qwen-audio-turbo",
        "input": {"messages": [{"role": "user", "content": [{"audio": audio}, {"text": "What is said?"}]}]},
        "parameters": {"max_tokens": 4, "temperature": 0},
    }


@dataclass
class Latencies:
    load: str
    ok: int
    failed: int
    p50_s: float
    p99_s: float
    hostile_sent: int = 0
    hostile_statuses: str = ""
    server_rss_mib: float = 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure(url: str, body: dict[str, Any], requests: int, timeout_s: float) -> tuple[list[float], int]:
    """`requests` ordinary requests, one at a time: their latencies, and how many failed."""
    latencies: list[float] = []
    failed = 0
    with httpx.Client(timeout=timeout_s) as client:
        for _ in range(requests):
            started = time.perf_counter()
            try:
                r = client.post(url + GENERATION, json=body, headers=AUTH)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                failed += 1
    return latencies, failed


# --- hostile loads (each in a process of its own) --------------------------------------------------------------


Request = tuple[str, dict[str, Any]]  # path, httpx.post keyword arguments


def huge_prompts(files: dict[str, Path]) -> list[Request]:
    text = "a" * (3 * 1024 * 1024)
    dashscope = {"model": "qwen-audio-turbo", "input": {"messages": [{"role": "user", "content": [{"text": text}]}]}}
    openai = {"model": "qwen-audio-turbo", "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    return [
        (GENERATION, {"content": json.dumps(dashscope).encode(), "headers": JSON}),
        (OPENAI_CHAT, {"content": json.dumps(openai).encode(), "headers": JSON}),
    ]


def stop_lists(files: dict[str, Path]) -> list[Request]:
    body = {
        "model": "qwen-audio-turbo",
        "input": {"messages": [{"role": "user", "content": [{"text": "Hi"}]}]},
        "parameters": {"max_tokens": 64, "stop": [f"stop-{i}" for i in range(200_000)]},
    }
    return [(GENERATION, {"content": json.dumps(body).encode(), "headers": JSON})]


def uploads(files: dict[str, Path]) -> list[Request]:
    blob = bytes(20 * 1024 * 1024)
    form = {
        "policy": base64.b64encode(b'{"forged": true}').decode(),
        "Signature": "Zm9yZ2Vk",
        "key": "dashscope-instant/x/y/z/a.wav",
        "OSSAccessKeyId": "ting",
        "success_action_status": "200",
    }
    return [(UPLOAD_HOST, {"data": form, "files": {"file": ("a.wav", blob)}})]  # no credentials


def decode_bombs(files: dict[str, Path]) -> list[Request]:
    return [
        (
            TRANSCRIPTIONS,
            {
                "data": {"model": "qwen-audio-turbo"},
                "headers": AUTH,
                "files": {"file": (files[name].name, files[name].read_bytes())},
            },
        )
        for name in ("opus_2h", "mp3_2h", "wav_52min")
    ]


BUILDERS: dict[str, Callable[[dict[str, Path]], list[Request]]] = {
    "huge_prompts": huge_prompts,
    "stop_lists": stop_lists,
    "uploads": uploads,
    "decode_bombs": decode_bombs,
}
CONCURRENCY = {"huge_prompts": 8, "stop_lists": 8, "uploads": 4, "decode_bombs": 4}


def run_load(
    name: str,
    url: str,
    files: dict[str, Path],
    stop: Any,
    ready: Any,
    report: Any,
    max_requests: int,
    max_s: float,
    idle_sockets: int,
) -> None:
    """The body of a load process: send hostile requests (or hold idle sockets) until told to stop, or bounded."""
    if name == "idle_sockets":
        _hold_idle_sockets(url, idle_sockets, stop, ready, report, max_s)
        return
    requests = BUILDERS[name](files)
    asyncio.run(_flood(url, requests, CONCURRENCY[name], stop, ready, report, max_requests, max_s))


async def _flood(
    url: str,
    requests: list[Request],
    concurrency: int,
    stop: Any,
    ready: Any,
    report: Any,
    max_requests: int,
    max_s: float,
) -> None:
    deadline = time.monotonic() + max_s
    statuses: dict[str, int] = {}
    sent = 0

    async def client(i: int) -> None:
        nonlocal sent
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            while not stop.is_set() and time.monotonic() < deadline and sent < max_requests:
                path, kwargs = requests[(sent + i) % len(requests)]
                sent += 1
                try:
                    r = await http.post(path, **kwargs)
                    key = str(r.status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                statuses[key] = statuses.get(key, 0) + 1
                ready.set()

    async def watch() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(client(i)) for i in range(concurrency)]
    await watch()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    report.put((sent, statuses))


def _hold_idle_sockets(url: str, count: int, stop: Any, ready: Any, report: Any, max_s: float) -> None:
    host, port = url.removeprefix("http://").split(":")
    held: list[socket.socket] = []
    failures = 0
    for _ in range(count):
        try:
            held.append(socket.create_connection((host, int(port)), timeout=5))
        except OSError:
            failures += 1
    ready.set()
    stop.wait(max_s)
    closed_by_server = 0
    for s in held:
        s.setblocking(False)
        with contextlib.suppress(OSError):
            closed_by_server += s.recv(1) == b""
        s.close()
    report.put((len(held), {"open": len(held), "connect failed": failures, "closed by server": closed_by_server}))


# --- the run -------------------------------------------------------------------------------------------------


def make_files(directory: Path) -> dict[str, Path]:
    files = C.long_recordings(directory)
    silence = bytes(25 * 1024 * 1024 - 64)  # 8 kHz, 8-bit mono: 52 min, compresses to nothing
    files["wav_52min"] = directory / "52min.wav"
    files["wav_52min"].write_bytes(C.wav_header(rate=8000, channels=1, bits=8, data_bytes=len(silence)) + silence)
    files["clip_1s"] = C.write_wav(directory / "clip.wav", C.tone(1.0))
    return files


def phase(
    name: str, server: Server, body: dict[str, Any], files: dict[str, Path], args: argparse.Namespace
) -> Latencies:
    if name.startswith("idle"):
        latencies, failed = measure(server.url, body, args.requests, args.timeout_s)
        return Latencies(
            name,
            len(latencies),
            failed,
            percentile(latencies, 0.5),
            percentile(latencies, 0.99),
            server_rss_mib=server.rss_mib(),
        )
    ctx = multiprocessing.get_context("spawn")
    stop, ready, report = ctx.Event(), ctx.Event(), ctx.Queue()
    load = ctx.Process(
        target=run_load,
        args=(name, server.url, files, stop, ready, report, args.max_hostile, args.max_phase_s, args.idle_sockets),
        daemon=True,
    )
    load.start()
    ready.wait(args.max_phase_s)
    time.sleep(args.warmup_s)  # the load is in full flight
    latencies, failed = measure(server.url, body, args.requests, args.timeout_s)
    rss = server.rss_mib()
    stop.set()
    try:
        sent, statuses = report.get(timeout=args.max_phase_s)
    except Exception:
        sent, statuses = 0, {"no report": 1}
    load.join(30)
    if load.is_alive():
        load.kill()
    _quiet(server)
    return Latencies(
        name,
        len(latencies),
        failed,
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        sent,
        ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
        rss,
    )


def _quiet(server: Server, timeout_s: float = 60.0) -> None:
    """Wait until the server answers /health again after a load (what the load left running drains)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def table(rows: list[Latencies]) -> str:
    idle = rows[0].p99_s
    lines = [
        "| load | ordinary ok / failed | p50 (s) | p99 (s) | p99 / idle p99 | within 2x | hostile requests "
        "(statuses) | server RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r.p99_s / idle if idle else float("nan")
        within = "yes" if r.failed == 0 and ratio <= TARGET_RATIO else "**no**"
        hostile = f"{r.hostile_sent} ({r.hostile_statuses})" if r.hostile_statuses else "–"
        lines.append(
            f"| {r.load} | {r.ok} / {r.failed} | {r.p50_s:.3f} | {r.p99_s:.3f} | {ratio:.2f} | {within} | "
            f"{hostile} | {r.server_rss_mib:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", default=",".join(LOADS), help=f"comma list of: {', '.join(LOADS)}")
    parser.add_argument("--requests", type=int, default=40, help="ordinary requests per phase (one at a time)")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="seconds a load runs before measuring")
    parser.add_argument("--max-phase-s", type=float, default=180.0, help="most seconds a load may run")
    parser.add_argument("--max-hostile", type=int, default=2000, help="most hostile requests per load")
    parser.add_argument("--idle-sockets", type=int, default=2000, help="connections the idle-sockets load holds")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="an ordinary request's timeout")
    args = parser.parse_args()
    loads = [name for name in args.loads.split(",") if name]
    unknown = set(loads) - set(LOADS)
    if unknown:
        parser.error(f"unknown loads: {', '.join(sorted(unknown))}")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the idle sockets (the server inherits it)
    with tempfile.TemporaryDirectory(prefix="ting-hostile-") as tmp:
        work = Path(tmp)
        files = make_files(work / "audio")
        server = Server(work, free_port())
        try:
            server.wait_ready()
            body = ordinary_body(files["clip_1s"].read_bytes())
            measure(server.url, body, 3, args.timeout_s)  # warm-up
            rows = [phase("idle", server, body, files, args)]
            for name in loads:
                print(f"running {name} ...", file=sys.stderr, flush=True)
                rows.append(phase(name, server, body, files, args))
            rows.append(phase("idle (again)", server, body, files, args))
        finally:
            server.stop()
    print(table(rows))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "hostile.json").write_text(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "settings": vars(args),
                "rows": [asdict(r) for r in rows],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
