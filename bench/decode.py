"""Decode benchmark: Ting's decoder against the ffmpeg command line, format by format, on one core.

For each format, a 30 s speech clip (espeak-ng, repeated to 30 s) is decoded to 16 kHz mono float32:
  Ting    `ting.audio.decode.decode_bytes` in a fresh process pinned to one core (best of 5 after a warm-up);
          peak memory is the rise in the process's maximum RSS during the decodes (PyAV and NumPy loaded)
  ffmpeg  `ffmpeg -threads 1 -i FILE -ac 1 -ar 16000 -f f32le -` pinned to the same core (best of 5);
          time and peak memory from its own -benchmark report (the whole process)
It also measures the isolated path the server uses (DecoderPool: one worker process, bytes over a pipe).

  python bench/decode.py            # prints a Markdown table; bench/out/decode.json keeps the numbers
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests import corpus as C  # noqa: E402

from ting.audio.decode import DecoderPool, decode_bytes  # noqa: E402

OUT = ROOT / "bench" / "out"
CLIP_S = 30.0
REPEATS = 5
FORMATS = [
    "wav_pcm_s16",
    "wav_stereo_48k_f32",
    "wav_gsm_ms",
    "amr_nb",
    "amr_wb",
    "3gp_amr_nb",
    "3gpp_aac",
    "aac_adts",
    "m4a_aac",
    "mp3_cbr",
    "mp3_vbr_id3",
    "flac",
    "ogg_vorbis",
    "ogg_opus",
    "webm_opus",
    "mp4_video",
]

TING_CHILD = """
import os, sys, time, json
os.sched_setaffinity(0, {0})
os.environ.setdefault("OMP_NUM_THREADS", "1")
from ting.audio.decode import decode_bytes

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

data = open(sys.argv[1], "rb").read()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
before = status("VmRSS:")  # modules loaded, file read
decode_bytes(data)  # warm-up (first-use initialisation)
times = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter(); d = decode_bytes(data); times.append(time.perf_counter() - t)
peak = status("VmHWM:")
print(json.dumps({"best_s": min(times), "seconds": len(d.samples) / 16000, "rss_kb": peak,
                  "rss_rise_kb": peak - before}))
"""


def ting_decode(path: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", TING_CHILD, str(path), str(REPEATS)], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout)


def ffmpeg_decode(path: Path) -> dict[str, float]:
    best, rss = float("inf"), 0
    for _ in range(REPEATS + 1):
        out = subprocess.run(
            [
                "taskset",
                "-c",
                "0",
                "ffmpeg",
                "-hide_banner",
                "-nostdin",
                "-benchmark",
                "-threads",
                "1",
                "-i",
                str(path),
                "-ac",
                "1",
                "-ar",
                "16000",
                "-f",
                "f32le",
                "-",
            ],
            capture_output=True,
            check=True,
        )
        report = out.stderr.decode(errors="replace")
        rtime = float(re.search(r"rtime=([\d.]+)s", report).group(1))  # type: ignore[union-attr]
        rss = int(re.search(r"maxrss=(\d+)kB", report).group(1))  # type: ignore[union-attr]
        best = min(best, rtime)
    return {"best_s": best, "seconds": len(out.stdout) / 4 / 16000, "rss_kb": rss}


async def pool_round_trip(paths: dict[str, Path]) -> dict[str, float]:
    pool = DecoderPool(1)
    await pool.start()
    try:
        result = {}
        for name, path in paths.items():
            data = path.read_bytes()
            await pool.decode(data)
            times = []
            for _ in range(REPEATS):
                t = time.perf_counter()
                await pool.decode(data)
                times.append(time.perf_counter() - t)
            result[name] = min(times)
        return result
    finally:
        await pool.close()


def thirty_seconds_of_speech(directory: Path) -> Path:
    import numpy as np

    clips = [decode_bytes(C.speak(lang, directory / f"{lang}.wav").read_bytes()).samples for lang in ("en", "zh")]
    joined = np.concatenate([np.concatenate([c, np.zeros(4000, dtype=np.float32)]) for c in clips])
    reps = int(np.ceil(CLIP_S * 16000 / len(joined)))
    samples = np.tile(joined, reps)[: int(CLIP_S * 16000)]
    return C.write_wav(directory / "speech30.wav", samples, rate=16000)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="ting-decode-bench-"))
    source = thirty_seconds_of_speech(work)
    paths = {name: C.FORMATS[name][0](source, work / name) for name in FORMATS}
    pool = asyncio.run(pool_round_trip(paths))
    rows = []
    for name, path in paths.items():
        ting, ff = ting_decode(path), ffmpeg_decode(path)
        rows.append({"format": name, "bytes": path.stat().st_size, "ting": ting, "ffmpeg": ff, "pool_s": pool[name]})
        print(f"{name:20s} ting {ting['best_s'] * 1000:7.1f} ms  ffmpeg {ff['best_s'] * 1000:7.1f} ms", flush=True)
    print()
    print(
        f"30 s clips, one core ({platform.processor() or platform.machine()}, Python {platform.python_version()}). "
        f"Best of {REPEATS}."
    )
    print()
    print(
        "| format | size KB | Ting ms | Ting × real time | ffmpeg CLI ms | ffmpeg × real time | Ting / ffmpeg time "
        "| Ting peak RSS rise MB | ffmpeg peak RSS MB | worker-pool round trip ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, f = r["ting"], r["ffmpeg"]
        print(
            f"| {r['format']} | {r['bytes'] // 1024} | {t['best_s'] * 1000:.1f} | {CLIP_S / t['best_s']:.0f} | "
            f"{f['best_s'] * 1000:.1f} | {CLIP_S / f['best_s']:.0f} | {t['best_s'] / f['best_s']:.2f} | "
            f"{t['rss_rise_kb'] / 1024:.1f} | {f['rss_kb'] / 1024:.1f} | {r['pool_s'] * 1000:.1f} |"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "decode.json").write_text(json.dumps({"machine": platform.processor(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
