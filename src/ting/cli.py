"""The `ting` command: the composition root.

  ting serve        run the server (DashScope and OpenAI APIs)
  ting tiny-model   write the offline random-weight test checkpoint
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import socket
import sys
import time
from collections.abc import Sequence

from ting import __version__
from ting.config import Settings, add_arguments, from_args


def setup_logging(level: str) -> None:
    """Plain logs on stderr; the access log (one JSON object per request) on stdout."""
    root = logging.getLogger()
    root.handlers.clear()
    errors = logging.StreamHandler(sys.stderr)
    errors.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(errors)
    root.setLevel(level.upper())
    access = logging.getLogger("ting.access")
    access.handlers.clear()
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(out)
    access.propagate = False
    access.setLevel(logging.INFO)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


async def _database_has_keys(settings: Settings) -> bool:
    from ting.store import Store

    store = Store(settings.database_url, home=settings.home_path)
    try:
        await store.open()
        return bool(await store.keys.list())
    finally:
        await store.close()


def cmd_serve(args: argparse.Namespace) -> int:
    settings = from_args(args)
    setup_logging(settings.log_level)
    log = logging.getLogger("ting.server")
    if not is_loopback(settings.host) and not settings.api_key and not settings.allow_no_auth \
            and not asyncio.run(_database_has_keys(settings)):
        print(f"ting: refusing to listen on {settings.host} with no API key: anyone who can reach it could use the "
              f"model. Create a key (ting keys create) or pass --api-key KEY, or --allow-no-auth to accept that.",
              file=sys.stderr)
        return 2
    if settings.model != "tiny":
        from ting.engine.qwen2_audio import resolve_checkpoint
        from ting.errors import ModelLoadError

        try:
            resolve_checkpoint(settings.model)
        except ModelLoadError as exc:
            print(f"ting: {exc.message}", file=sys.stderr)
            return 1
    import uvicorn

    from ting.api.app import create_app

    app = create_app(settings)
    log.info("Ting %s listening on http://%s:%d (DashScope base URL: http://%s:%d/api/v1); loading model %s",
             __version__, settings.host, settings.port, settings.host, settings.port, settings.model)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=int(settings.drain_timeout_s), proxy_headers=True,
                forwarded_allow_ips="127.0.0.1", lifespan="on")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from ting.engine import tiny

    started = time.monotonic()
    out = tiny.build(args.dir, args.preset, layers=args.layers, seed=args.seed)
    weights = ("with random weights" if tiny.PRESETS[args.preset]["weights"]
               else "without weights (serve with --load-format dummy)")
    print(f"wrote the {args.preset} Qwen2-Audio checkpoint to {out} {weights} in {time.monotonic() - started:.1f} s")
    return 0


# --- ting keys ------------------------------------------------------------------------------------------


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    import datetime

    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


async def _with_store(settings: Settings, action):  # type: ignore[no-untyped-def]
    from ting.store import Store

    store = Store(settings.database_url, home=settings.home_path)
    try:
        await store.open()
        return await action(store)
    finally:
        await store.close()


def cmd_keys(args: argparse.Namespace) -> int:
    from ting.errors import TingError

    settings = from_args(args)
    try:
        return asyncio.run(_with_store(settings, lambda store: _keys(args, store)))
    except TingError as exc:
        print(f"ting keys: {exc.message}", file=sys.stderr)
        return 1


async def _keys(args: argparse.Namespace, store) -> int:  # type: ignore[no-untyped-def]
    if args.keys_command == "create":
        key, info = await store.keys.create(
            name=args.name, quota_tokens=args.quota_tokens or None, expires_days=args.expires_days or None,
            rpm=args.rpm, max_concurrency=args.max_concurrency)
        print(key)
        print(f"Created {info.id} ({info.name or 'no name'}): quota "
              f"{info.quota_tokens if info.quota_tokens is not None else 'unlimited'} tokens, expires "
              f"{_when(info.expires_at)}, {info.rpm or 'unlimited'} requests/min, "
              f"{info.max_concurrency or 'unlimited'} at once. Store the key now: it is not shown again.",
              file=sys.stderr)
    elif args.keys_command == "list":
        rows = [[k.id, k.name, k.prefix + "…", k.state(), str(k.quota_tokens if k.quota_tokens is not None else "-"),
                 str(k.spent_tokens), str(k.reserved_tokens), str(k.rpm or "-"), str(k.max_concurrency or "-"),
                 _when(k.created_at), _when(k.expires_at)] for k in await store.keys.list()]
        print(_table(rows, ["ID", "NAME", "KEY", "STATE", "QUOTA", "SPENT", "RESERVED", "RPM", "AT ONCE", "CREATED",
                            "EXPIRES"]))
    elif args.keys_command == "revoke":
        info = await store.keys.revoke(args.key)
        print(f"revoked {info.id} ({info.prefix}…) at {_when(info.revoked_at)}")
    elif args.keys_command == "usage":
        key_id = (await store.keys.find(args.key)).id if args.key else None
        since = None
        if args.since:
            import datetime

            since = datetime.datetime.fromisoformat(args.since).replace(tzinfo=datetime.UTC).timestamp()
        rows = [[u.key_id or "-", u.key_name, str(u.requests), str(u.ok), str(u.refused), str(u.failed),
                 f"{u.audio_seconds:.1f}", str(u.audio_tokens), str(u.input_tokens), str(u.output_tokens),
                 str(u.charged_tokens)] for u in await store.ledger.summary(key_id=key_id, since=since)]
        print(_table(rows, ["KEY", "NAME", "REQUESTS", "OK", "REFUSED", "FAILED", "AUDIO S", "AUDIO TOK",
                            "INPUT TOK", "OUTPUT TOK", "CHARGED"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ting",
        description="Ting (听): a self-hosted server for Qwen2-Audio speaking the DashScope and OpenAI APIs.",
    )
    parser.add_argument("--version", action="version", version=f"ting {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("serve", help="run the server (DashScope and OpenAI APIs)",
                       description="Serve Qwen2-Audio over the DashScope API (/api/v1) and the OpenAI API (/v1). "
                       "Every option is also an environment variable (TING_<OPTION>).",
                       epilog="examples:\n  ting serve --model tiny                      # offline test model\n"
                       "  ting serve --model Qwen/Qwen2-Audio-7B-Instruct --host 0.0.0.0 --api-key $KEY",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", help="API keys, quotas and usage",
                          description="Manage API keys in the server's database (the same --home / --database). "
                          "Once any key exists, every API request needs a valid one.",
                          epilog="examples:\n  ting keys create --name alice --quota-tokens 100000 --rpm 60\n"
                          "  ting keys list\n  ting keys usage --since 2026-11-01\n  ting keys revoke sk-ting-Ab12",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    keys_sub.required = True
    k = keys_sub.add_parser("create", help="create a key (printed once)")
    k.add_argument("--name", default="", help="who or what the key is for")
    k.add_argument("--quota-tokens", type=int, default=100_000,
                   help="tokens the key may spend (audio + input + output; default 100000, 0 = unlimited)")
    k.add_argument("--expires-days", type=float, default=180,
                   help="days until the key expires (default 180, 0 = never)")
    k.add_argument("--rpm", type=int, default=None, help="requests per minute (default: unlimited)")
    k.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at once (default: unlimited)")
    keys_sub.add_parser("list", help="list keys with their balances")
    k = keys_sub.add_parser("revoke", help="revoke a key")
    k.add_argument("key", help="key id or displayed prefix")
    k = keys_sub.add_parser("usage", help="usage per key, from the ledger")
    k.add_argument("--key", default=None, help="only this key (id or prefix)")
    k.add_argument("--since", default=None, help="only requests since this date (YYYY-MM-DD)")
    for action in keys_sub.choices.values():
        add_arguments(action, ["home", "database"])
    keys.set_defaults(func=cmd_keys)

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
