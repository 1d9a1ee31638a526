"""The `ting` command: the composition root.

  ting serve        run the server (DashScope and OpenAI APIs)
  ting chat         ask about a recording (streams the answer; -i for a conversation)
  ting transcribe   the words in a recording (text, srt, vtt or json)
  ting keys         API keys, quotas and usage
  ting tiny-model   write the offline random-weight test checkpoint
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import socket
import sys
import time
from collections.abc import Sequence

from ting import __version__
from ting.config import Settings, add_arguments, from_args

QUIET_LOGGERS = ("httpx", "httpcore", "hpack", "urllib3", "multipart", "python_multipart")


def setup_logging(level: str) -> None:
    """Plain logs on stderr; the access log (one JSON object per request) on stdout."""
    root = logging.getLogger()
    root.handlers.clear()
    errors = logging.StreamHandler(sys.stderr)
    errors.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(errors)
    root.setLevel(level.upper())
    for chatty in QUIET_LOGGERS:  # they log every URL they fetch, signed query strings included
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
    access = logging.getLogger("ting.access")
    access.handlers.clear()
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(out)
    access.propagate = False
    access.setLevel(logging.INFO)


def is_loopback(host: str) -> bool:
    """Whether listening on `host` reaches this machine only. An empty host means every interface: not loopback."""
    host = host.strip().strip("[]")
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return _loopback_address(host)
    except ValueError:
        try:
            return all(_loopback_address(info[4][0]) for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def listen_address(host: str) -> str:
    """The address to bind: an IPv4-mapped IPv6 address (::ffff:a.b.c.d) as the IPv4 address it stands for."""
    try:
        mapped = getattr(ipaddress.ip_address(host.strip().strip("[]")), "ipv4_mapped", None)
    except ValueError:
        return host
    return str(mapped) if mapped else host


def _loopback_address(text: str) -> bool:
    address = ipaddress.ip_address(text)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is 127.0.0.1
    return bool((mapped or address).is_loopback)


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
        where = settings.host.strip() or "every interface (empty --host)"
        print(f"ting: refusing to listen on {where} with no API key: anyone who can reach it could use the "
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
    from ting.api.connections import uvicorn_options

    settings = settings.replace(host=listen_address(settings.host))
    app = create_app(settings)
    log.info("Ting %s listening on http://%s:%d (DashScope base URL: http://%s:%d/api/v1); loading model %s",
             __version__, settings.host, settings.port, settings.host, settings.port, settings.model)
    # uvicorn drains in-flight requests on SIGTERM / SIGINT, then raises the signal again so the exit status shows
    # it; after a clean drain Ting exits 0 instead. (A second signal during the drain still forces the exit.)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=settings.host, port=settings.port, **uvicorn_options(settings))
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from ting.engine import tiny

    started = time.monotonic()
    out = tiny.build(args.dir, args.preset, layers=args.layers, seed=args.seed)
    weights = ("with random weights" if tiny.PRESETS[args.preset]["weights"]
               else "without weights (serve with --load-format dummy)")
    print(f"wrote the {args.preset} Qwen2-Audio checkpoint to {out} {weights} in {time.monotonic() - started:.1f} s")
    return 0


# --- ting chat / ting transcribe (clients of a running server) ----------------------------------------------


def _client_error(command: str, exc: Exception, url: str) -> int:
    from ting.client import AuthenticationError, ConnectionFailed

    if isinstance(exc, ConnectionFailed):
        print(f"ting {command}: cannot reach {url}. Is `ting serve` running there? (set --url or TING_BASE_URL)",
              file=sys.stderr)
    elif isinstance(exc, AuthenticationError):
        print(f"ting {command}: {exc}. Pass --api-key or set TING_API_KEY.", file=sys.stderr)
    else:
        print(f"ting {command}: {exc}", file=sys.stderr)
    return 1


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ting.client import Client

    return Client(args.url, args.api_key, model=args.model)


def cmd_chat(args: argparse.Namespace) -> int:
    from ting.client import TingError

    client = _client(args)
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    try:
        audio = args.audio
        if args.interactive and not audio.startswith(("http://", "https://")):
            audio = client.upload(audio)  # once, so follow-up questions do not send it again
        history = None
        prompt = args.prompt
        first = True
        while True:
            if args.interactive and not (first and prompt):
                try:
                    prompt = input("> ").strip()
                except EOFError:
                    print()
                    return 0
                if not prompt:
                    return 0
            deltas = client.chat(prompt or None, audio=audio if first else None, history=history, system=args.system,
                                 stream=True, **params)
            text = ""
            for delta in deltas:
                text += delta.text
                sys.stdout.write(delta.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            if not args.interactive:
                return 0
            user = {"role": "user", "content": ([{"audio": audio}] if first else []) + ([{"text": prompt}] if prompt
                                                                                         else [])}
            history = [*(history or []), user, {"role": "assistant", "content": [{"text": text}]}]
            first, prompt = False, None
    except TingError as exc:
        return _client_error("chat", exc, client.base_url)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        client.close()


def cmd_transcribe(args: argparse.Namespace) -> int:
    import json

    from ting.client import TingError

    client = _client(args)
    try:
        result = client.transcribe(args.audio, language=args.language, prompt=args.prompt, translate=args.translate,
                                   response_format=args.format)
    except TingError as exc:
        return _client_error("transcribe", exc, client.base_url)
    finally:
        client.close()
    if isinstance(result, str):
        sys.stdout.write(result if result.endswith("\n") else result + "\n")
    else:
        print(json.dumps({"text": result.text, "duration": result.duration, "language": result.language,
                          "segments": [{"start": s.start, "end": s.end, "text": s.text} for s in result.segments]},
                         ensure_ascii=False, indent=2))
    return 0


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="server base URL (default: $TING_BASE_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="API key (default: $TING_API_KEY or $DASHSCOPE_API_KEY)")
    p.add_argument("--model", default="qwen-audio-turbo-latest", help="model name (default: qwen-audio-turbo-latest)")


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

    p = sub.add_parser("chat", help="ask about a recording; the answer streams to the terminal",
                       description="Ask the server about a recording (a file, or an http(s) URL the server may "
                       "fetch). Without a prompt the recording itself is the question (voice chat).",
                       epilog="examples:\n  ting chat meeting.wav \"What is said?\"\n  ting chat -i interview.mp3"
                       "              # keep asking about the same recording\n  ting chat question.wav"
                       "               # voice chat: the recording is the question",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("audio", help="audio file or http(s) URL")
    p.add_argument("prompt", nargs="?", default=None, help="what to ask (optional)")
    p.add_argument("-i", "--interactive", action="store_true", help="keep asking follow-up questions (empty line ends)")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--max-tokens", type=int, default=None, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=None, help="0 for greedy, up to 2")
    p.add_argument("--seed", type=int, default=None, help="same seed, same answer")
    _client_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("transcribe", help="the words in a recording (text, srt, vtt or json)",
                       description="Transcribe (or translate to English) a recording of up to 10 minutes; long "
                       "recordings are cut into 30 s windows, each a subtitle cue.",
                       epilog="examples:\n  ting transcribe talk.mp3\n  ting transcribe talk.mp3 --format srt > "
                       "talk.srt\n  ting transcribe 会议.m4a --language zh --format vtt\n  ting transcribe "
                       "interview.wav --translate",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("audio", help="audio file or http(s) URL")
    p.add_argument("--format", choices=["text", "srt", "vtt", "json"], default="text", help="output (default text)")
    p.add_argument("--language", default=None, help="the spoken language, as an ISO-639 code (en, zh, yue, ...)")
    p.add_argument("--prompt", default=None, help="names or terms that may appear (helps spelling)")
    p.add_argument("--translate", action="store_true", help="translate into English instead")
    _client_options(p)
    p.set_defaults(func=cmd_transcribe)

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
