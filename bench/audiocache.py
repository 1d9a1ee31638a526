"""Audio cache benchmark: what a follow-up turn saves when the recording it resends is not decoded again.

A 30 s speech clip (espeak-ng, repeated to 30 s; the same source as bench/decode.py) in two formats is loaded through
the server's own AudioLoader (real fetcher and guard, one real decoder worker process), the way a chat turn loads it:
  URL      from a loopback origin that sends an ETag and answers conditional GETs with 304
  data:    the same bytes as a base64 data: URI (what the SDKs send for a local file)
each first with the cache off (--audio-cache-mib 0: downloaded or parsed, then decoded, every turn) and then with it
on, after a first load (a hit: a 304 and no decode; or base64 parsed and hashed, no decode). Median of 15 loads.

  python bench/audiocache.py        # prints a Markdown table; bench/out/audiocache.json keeps the numbers
"""

from __future__ import annotations

import asyncio
import base64
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.decode import thirty_seconds_of_speech  # noqa: E402
from tests import corpus as C  # noqa: E402
from tests.origin import Origin, Request, Route, send  # noqa: E402

from ting.audio import AudioCache, AudioLoader, AudioSources, DecoderPool, HttpFetcher, MediaGuard  # noqa: E402

OUT = ROOT / "bench" / "out"
LOADS = 15
FORMATS = ["mp3_cbr", "ogg_opus"]
MiB = 1024 * 1024


def etag_route(data: bytes) -> Route:
    async def route(writer: asyncio.StreamWriter, request: Request) -> None:
        if request.headers.get("if-none-match") == '"v1"':
            await send(writer, 304, b"", {"ETag": '"v1"'})
        else:
            await send(writer, 200, data, {"ETag": '"v1"'})

    return route


async def median_load_s(loader: AudioLoader, source: str) -> float:
    await loader.load(source)  # a warm-up, and the first load that fills the cache
    times = []
    for _ in range(LOADS):
        started = time.perf_counter()
        await loader.load(source)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def measure(paths: dict[str, Path]) -> list[dict[str, Any]]:
    origin = await Origin().start()
    pool = DecoderPool(1)
    await pool.start()
    rows: list[dict[str, Any]] = []
    try:
        for name, path in paths.items():
            data = path.read_bytes()
            origin.routes[f"/{name}"] = etag_route(data)
            sources = {"URL": f"{origin.base}/{name}", "data:": "data:;base64," + base64.b64encode(data).decode()}
            for kind, source in sources.items():
                row: dict[str, Any] = {"format": name, "bytes": len(data), "source": kind}
                for cache_mib in (0, 256):
                    fetcher = HttpFetcher(MediaGuard(("127.0.0.1",)), max_bytes=10 * MiB)
                    loader = AudioLoader(
                        AudioSources(fetcher, None, max_bytes=10 * MiB), pool, AudioCache(cache_mib * MiB)
                    )
                    row["hit_s" if cache_mib else "cold_s"] = await median_load_s(loader, source)
                    await fetcher.aclose()
                rows.append(row)
                print(f"{name:10s} {kind:5s} cold {row['cold_s'] * 1000:7.2f} ms  hit {row['hit_s'] * 1000:6.2f} ms")
    finally:
        await pool.close()
        await origin.close()
    return rows


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="ting-audiocache-bench-"))
    source = thirty_seconds_of_speech(work)
    paths = {name: C.FORMATS[name][0](source, work / name) for name in FORMATS}
    rows = asyncio.run(measure(paths))
    print()
    print(f"30 s clips ({platform.processor() or platform.machine()}, Python {platform.python_version()}). ", end="")
    print(f"Median of {LOADS} loads.")
    print()
    print("| format | size KB | source | cache off: fetch + decode ms | cache hit ms | saved ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cold, hit = float(r["cold_s"]), float(r["hit_s"])
        print(
            f"| {r['format']} | {int(r['bytes']) // 1024} | {r['source']} | {cold * 1000:.1f} | {hit * 1000:.1f} | "
            f"{(cold - hit) * 1000:.1f} |"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "audiocache.json").write_text(json.dumps({"machine": platform.processor(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
