"""Plain-WAV fast path against the FFmpeg worker: one decode of a 2.6 s and of a 30 s 16 kHz mono s16 WAV.

Both go through `DecoderPool.decode`, as the server calls it (one worker, after a warm-up):
  fast path   the plain WAV: made in this process (audio/wav.py), no worker asked
  worker      the same WAV with a `fact` chunk before its data, which the fast path leaves to FFmpeg: the worker's
              work is that of any plain WAV (the fast path before it existed)
For each: wall time per decode (median), CPU per decode in this process (the server's share: parsing, or the pipe
round trip and its thread) and in the worker process (psutil), over N decodes.

  python bench/wavpath.py
"""

from __future__ import annotations

import asyncio
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from ting.audio.decode import DecoderPool  # noqa: E402

RUNS = {2.6: 200, 30.0: 40}


def wav(seconds: float, *, fact: bool) -> bytes:
    pcm = (np.sin(np.arange(int(seconds * 16000)) * 0.05) * 12000).astype("<i2").tobytes()
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
    extra = b"fact" + struct.pack("<II", 4, len(pcm) // 2) if fact else b""
    body = b"WAVE" + fmt + extra + b"data" + struct.pack("<I", len(pcm)) + pcm
    return b"RIFF" + struct.pack("<I", len(body)) + body


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def measure(pool: DecoderPool, data: bytes, runs: int) -> tuple[float, float, float, int]:
    me = psutil.Process()
    workers = me.children(recursive=True)
    for _ in range(3):
        clip = await pool.decode(data)
    walls = []
    before_me, before_workers = cpu(me), sum(cpu(w) for w in workers)
    for _ in range(runs):
        started = time.perf_counter()
        clip = await pool.decode(data)
        walls.append(time.perf_counter() - started)
    used_me = cpu(me) - before_me
    used_workers = sum(cpu(w) for w in workers) - before_workers
    return statistics.median(walls) * 1000, used_me / runs * 1000, used_workers / runs * 1000, len(clip.samples)


async def main() -> None:
    pool = DecoderPool(1, timeout_s=30.0)
    await pool.start()
    try:
        print("| clip | path | samples | wall ms (median) | server CPU ms | worker CPU ms | total CPU ms |")
        print("|---|---|---|---|---|---|---|")
        for seconds, runs in RUNS.items():
            for name, fact in (("fast path", False), ("FFmpeg worker", True)):
                wall, mine, theirs, n = await measure(pool, wav(seconds, fact=fact), runs)
                cells = f"{n} | {wall:.2f} | {mine:.2f} | {theirs:.2f} | {mine + theirs:.2f}"
                print(f"| {seconds:g} s | {name} | {cells} |")
    finally:
        await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
