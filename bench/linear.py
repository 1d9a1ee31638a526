"""Small-batch matrix products on CPU: why a batched decoding step keeps its weights in oneDNN's blocked layout.

A decoding step multiplies a few rows (one per running request) by every weight matrix. This times y = x @ W.T
for the real model's shapes three ways, in the same run, with the engine's own functions:
  plain    torch.nn.functional.linear (MKL; what transformers does)
  chunked  W @ x.T, 1024 rows of W at a time (Ting's fallback when the blocked copy does not fit in memory)
  blocked  oneDNN with W kept in its blocked layout (Ting's default on CPU in float32; a second copy of W)
and prints milliseconds per product, median of 20, with each one's speed-up over plain.

  python bench/linear.py
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from ting.engine.qwen2_audio import blocked_linear, chunked_linear

SHAPES = {
    "q/k/v/o projection": (4096, 4096),
    "MLP up/gate": (11008, 4096),
    "MLP down": (4096, 11008),
    "lm_head": (156032, 4096),
}
ROWS = (1, 4, 16, 64)


def timed(fn, repeats: int = 20) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    torch.manual_seed(0)
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, float32; ms per product (median of 20), speed-up over plain"
    )
    print()
    print("| weight | rows | plain ms | chunked ms | blocked ms | chunked × | blocked × |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, (out_f, in_f) in SHAPES.items():
            w = torch.randn(out_f, in_f) * 0.02
            packed = (w.to_mkldnn(), None)
            for rows in ROWS:
                x = torch.randn(rows, in_f)
                want = torch.nn.functional.linear(x, w)
                assert torch.allclose(chunked_linear(x, w), want, atol=1e-4)
                assert torch.allclose(blocked_linear(x, packed), want, atol=1e-4)
                plain_ms = timed(lambda x=x, w=w: torch.nn.functional.linear(x, w))
                chunked_ms = timed(lambda x=x, w=w: chunked_linear(x, w))
                blocked_ms = timed(lambda x=x, packed=packed: blocked_linear(x, packed))
                print(
                    f"| {name} {out_f}×{in_f} | {rows} | {plain_ms:.2f} | {chunked_ms:.2f} | {blocked_ms:.2f} | "
                    f"{plain_ms / chunked_ms:.2f} | {plain_ms / blocked_ms:.2f} |",
                    flush=True,
                )
            del w, packed


if __name__ == "__main__":
    main()
