"""The `ting` command: the composition root.

  ting serve        run the server (DashScope and OpenAI APIs)
  ting tiny-model   write the offline random-weight test checkpoint
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from ting.engine import tiny

    started = time.monotonic()
    out = tiny.build(args.dir, args.preset, layers=args.layers, seed=args.seed)
    weights = ("with random weights" if tiny.PRESETS[args.preset]["weights"]
               else "without weights (serve with --load-format dummy)")
    print(f"wrote the {args.preset} Qwen2-Audio checkpoint to {out} {weights} in {time.monotonic() - started:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ting",
        description="Ting (听): a self-hosted server for Qwen2-Audio speaking the DashScope and OpenAI APIs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("tiny-model", help="write a small random-weight Qwen2-Audio checkpoint (offline)",
                       description="Write a deterministic random-weight Qwen2-Audio checkpoint that transformers loads "
                       "unchanged. Tests, CI and offline demos run on it.",
                       epilog="example: ting tiny-model ./tiny && ting serve --model ./tiny")
    p.add_argument("dir", help="directory to write (created if missing)")
    p.add_argument("--preset", choices=["tiny", "real-width", "7b"], default="tiny",
                   help="tiny: test model with weights; real-width / 7b: real shapes, config only (benchmarks)")
    p.add_argument("--layers", type=int, default=None, help="encoder and decoder layers (real-width default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    p.set_defaults(func=cmd_tiny_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
