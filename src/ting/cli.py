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
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeAlias

from ting import __version__
from ting.config import Settings, add_arguments, from_args

if TYPE_CHECKING:
    from ting.store import Store

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
            return all(_loopback_address(str(info[4][0])) for info in socket.getaddrinfo(host, None))
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
    if (
        not is_loopback(settings.host)
        and not settings.api_key
        and not settings.allow_no_auth
        and not asyncio.run(_database_has_keys(settings))
    ):
        where = settings.host.strip() or "every interface (empty --host)"
        print(
            f"ting: refusing to listen on {where} with no API key: anyone who can reach it could use the "
            f"model. Create a key (ting keys create) or pass --api-key KEY, or --allow-no-auth to accept that.",
            file=sys.stderr,
        )
        return 2
    if not 0 < 3 * settings.instance_heartbeat_s <= settings.instance_timeout_s:
        print(
            f"ting: --instance-timeout-s ({settings.instance_timeout_s:g}) must be at least 3 heartbeats "
            f"(--instance-heartbeat-s {settings.instance_heartbeat_s:g}): a live replica must not be taken for dead.",
            file=sys.stderr,
        )
        return 2
    if settings.load_format not in ("auto", "dummy"):
        print(
            f"ting: unknown --load-format {settings.load_format!r}: use auto (the checkpoint's weights) or dummy "
            f"(random weights).",
            file=sys.stderr,
        )
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
    runtime = app.state.runtime
    log.info(
        "Ting %s listening on http://%s:%d (DashScope base URL: http://%s:%d/api/v1); loading model %s",
        __version__,
        settings.host,
        settings.port,
        settings.host,
        settings.port,
        settings.model,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            if runtime.loop is not None:  # readiness turns false at once; the drain clock starts
                runtime.loop.call_soon_threadsafe(runtime.begin_drain)

    # uvicorn drains in-flight requests on SIGTERM / SIGINT, then raises the signal again so the exit status shows
    # it; Ting exits 0 after a clean drain instead, 1 when requests had to be cut. (A second signal during the
    # drain still forces the exit.) uvicorn's own deadline is a backstop past Ting's drain, which cuts first.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    Server(uvicorn.Config(app, host=settings.host, port=settings.port, **uvicorn_options(settings))).run()
    if not runtime.drain_clean:
        print(
            f"ting: requests still running after --drain-timeout-s {settings.drain_timeout_s:g} were cut "
            f"(each got an error and was settled with what it used)",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from ting.engine import tiny

    started = time.monotonic()
    out = tiny.build(args.dir, args.preset, layers=args.layers, seed=args.seed)
    weights = (
        "with random weights"
        if tiny.PRESETS[args.preset]["weights"]
        else "without weights (serve with --load-format dummy)"
    )
    print(f"wrote the {args.preset} Qwen2-Audio checkpoint to {out} {weights} in {time.monotonic() - started:.1f} s")
    return 0


# --- ting chat / ting transcribe (clients of a running server) ----------------------------------------------


def _client_error(command: str, exc: Exception, url: str) -> int:
    from ting.client import AuthenticationError, ConnectionFailed

    if isinstance(exc, ConnectionFailed):
        print(
            f"ting {command}: cannot reach {url}. Is `ting serve` running there? (set --url or TING_BASE_URL)",
            file=sys.stderr,
        )
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
        history: list[dict[str, Any]] = []
        for prompt in _questions(args):
            first = not history
            deltas = client.chat(
                prompt or None,
                audio=audio if first else None,
                history=history or None,
                system=args.system,
                stream=True,
                **params,
            )
            text = _print_stream(deltas)
            user = {
                "role": "user",
                "content": ([{"audio": audio}] if first else []) + ([{"text": prompt}] if prompt else []),
            }
            history += [user, {"role": "assistant", "content": [{"text": text}]}]
        return 0
    except TingError as exc:
        return _client_error("chat", exc, client.base_url)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        client.close()


def _questions(args: argparse.Namespace) -> Iterator[str | None]:
    """The prompt on the command line; with --interactive, then each line typed, until an empty line or EOF."""
    if args.prompt or not args.interactive:
        yield args.prompt
    while args.interactive:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        if not line:
            return
        yield line


def _print_stream(deltas: Iterable[Any]) -> str:
    """Print an answer as it streams in; the whole text."""
    text = ""
    for delta in deltas:
        text += delta.text
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return text


def cmd_transcribe(args: argparse.Namespace) -> int:
    import json

    from ting.client import TingError

    client = _client(args)
    try:
        result = client.transcribe(
            args.audio,
            language=args.language,
            prompt=args.prompt,
            translate=args.translate,
            response_format=args.format,
        )
    except TingError as exc:
        return _client_error("transcribe", exc, client.base_url)
    finally:
        client.close()
    if isinstance(result, str):
        sys.stdout.write(result if result.endswith("\n") else result + "\n")
    else:
        print(
            json.dumps(
                {
                    "text": result.text,
                    "duration": result.duration,
                    "language": result.language,
                    "segments": [{"start": s.start, "end": s.end, "text": s.text} for s in result.segments],
                },
                ensure_ascii=False,
                indent=2,
            )
        )
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


async def _with_store(settings: Settings, action: Callable[[Store], Awaitable[None]]) -> None:
    from ting.store import Store

    store = Store(settings.database_url, home=settings.home_path)
    try:
        await store.open()
        await action(store)
    finally:
        await store.close()


def cmd_keys(args: argparse.Namespace) -> int:
    from ting.errors import TingError

    settings = from_args(args)
    try:
        asyncio.run(_with_store(settings, lambda store: args.action(args, store)))
    except TingError as exc:
        print(f"ting keys: {exc.message}", file=sys.stderr)
        return 1
    return 0


async def _keys_create(args: argparse.Namespace, store: Store) -> None:
    key, info = await store.keys.create(
        name=args.name,
        quota_tokens=args.quota_tokens or None,
        expires_days=args.expires_days or None,
        rpm=args.rpm,
        max_concurrency=args.max_concurrency,
    )
    print(key)
    print(
        f"Created {info.id} ({info.name or 'no name'}): quota "
        f"{info.quota_tokens if info.quota_tokens is not None else 'unlimited'} tokens, expires "
        f"{_when(info.expires_at)}, {info.rpm or 'unlimited'} requests/min, "
        f"{info.max_concurrency or 'unlimited'} at once. Store the key now: it is not shown again.",
        file=sys.stderr,
    )


async def _keys_list(args: argparse.Namespace, store: Store) -> None:
    rows = [
        [
            k.id,
            k.name,
            k.prefix + "…",
            k.state(),
            str(k.quota_tokens if k.quota_tokens is not None else "-"),
            str(k.spent_tokens),
            str(k.reserved_tokens),
            str(k.rpm or "-"),
            str(k.max_concurrency or "-"),
            _when(k.created_at),
            _when(k.expires_at),
        ]
        for k in await store.keys.list()
    ]
    print(
        _table(
            rows, ["ID", "NAME", "KEY", "STATE", "QUOTA", "SPENT", "RESERVED", "RPM", "AT ONCE", "CREATED", "EXPIRES"]
        )
    )


async def _keys_revoke(args: argparse.Namespace, store: Store) -> None:
    info = await store.keys.revoke(args.key)
    print(f"revoked {info.id} ({info.prefix}…) at {_when(info.revoked_at)}")


async def _keys_usage(args: argparse.Namespace, store: Store) -> None:
    key_id = (await store.keys.find(args.key)).id if args.key else None
    since = None
    if args.since:
        import datetime

        since = datetime.datetime.fromisoformat(args.since).replace(tzinfo=datetime.UTC).timestamp()
    rows = [
        [
            u.key_id or "-",
            u.key_name,
            str(u.requests),
            str(u.ok),
            str(u.refused),
            str(u.failed),
            f"{u.audio_seconds:.1f}",
            str(u.audio_tokens),
            str(u.input_tokens),
            str(u.output_tokens),
            str(u.charged_tokens),
        ]
        for u in await store.ledger.summary(key_id=key_id, since=since)
    ]
    print(
        _table(
            rows,
            [
                "KEY",
                "NAME",
                "REQUESTS",
                "OK",
                "REFUSED",
                "FAILED",
                "AUDIO S",
                "AUDIO TOK",
                "INPUT TOK",
                "OUTPUT TOK",
                "CHARGED",
            ],
        )
    )


# --- the parser: one small function per command ---------------------------------------------------------------

Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _examples(*lines: str) -> dict[str, Any]:
    return {
        "epilog": "examples:\n" + "\n".join(f"  {line}" for line in lines),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def _add_serve(sub: Commands) -> None:
    p = sub.add_parser(
        "serve",
        help="run the server (DashScope and OpenAI APIs)",
        description="Serve Qwen2-Audio over the DashScope API (/api/v1) and the OpenAI API (/v1). "
        "Every option is also an environment variable (TING_<OPTION>).",
        **_examples(
            "ting serve --model tiny                      # offline test model",
            "ting serve --model Qwen/Qwen2-Audio-7B-Instruct --host 0.0.0.0 --api-key $KEY",
        ),
    )
    add_arguments(p)
    p.set_defaults(func=cmd_serve)


def _add_chat(sub: Commands) -> None:
    p = sub.add_parser(
        "chat",
        help="ask about a recording; the answer streams to the terminal",
        description="Ask the server about a recording (a file, or an http(s) URL the server may "
        "fetch). Without a prompt the recording itself is the question (voice chat).",
        **_examples(
            'ting chat meeting.wav "What is said?"',
            "ting chat -i interview.mp3              # keep asking about the same recording",
            "ting chat question.wav               # voice chat: the recording is the question",
        ),
    )
    p.add_argument("audio", help="audio file or http(s) URL")
    p.add_argument("prompt", nargs="?", default=None, help="what to ask (optional)")
    p.add_argument("-i", "--interactive", action="store_true", help="keep asking follow-up questions (empty line ends)")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--max-tokens", type=int, default=None, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=None, help="0 for greedy, up to 2")
    p.add_argument("--seed", type=int, default=None, help="same seed, same answer")
    _client_options(p)
    p.set_defaults(func=cmd_chat)


def _add_transcribe(sub: Commands) -> None:
    p = sub.add_parser(
        "transcribe",
        help="the words in a recording (text, srt, vtt or json)",
        description="Transcribe (or translate to English) a recording of up to 10 minutes; long "
        "recordings are cut into 30 s windows, each a subtitle cue.",
        **_examples(
            "ting transcribe talk.mp3",
            "ting transcribe talk.mp3 --format srt > talk.srt",
            "ting transcribe 会议.m4a --language zh --format vtt",
            "ting transcribe interview.wav --translate",
        ),
    )
    p.add_argument("audio", help="audio file or http(s) URL")
    p.add_argument("--format", choices=["text", "srt", "vtt", "json"], default="text", help="output (default text)")
    p.add_argument("--language", default=None, help="the spoken language, as an ISO-639 code (en, zh, yue, ...)")
    p.add_argument("--prompt", default=None, help="names or terms that may appear (helps spelling)")
    p.add_argument("--translate", action="store_true", help="translate into English instead")
    _client_options(p)
    p.set_defaults(func=cmd_transcribe)


def _add_keys(sub: Commands) -> None:
    keys = sub.add_parser(
        "keys",
        help="API keys, quotas and usage",
        description="Manage API keys in the server's database (the same --home / --database). "
        "Once any key exists, every API request needs a valid one.",
        **_examples(
            "ting keys create --name alice --quota-tokens 100000 --rpm 60",
            "ting keys list",
            "ting keys usage --since 2026-11-01",
            "ting keys revoke sk-ting-Ab12",
        ),
    )
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    actions.required = True
    k = actions.add_parser("create", help="create a key (printed once)")
    k.add_argument("--name", default="", help="who or what the key is for")
    k.add_argument(
        "--quota-tokens",
        type=int,
        default=100_000,
        help="tokens the key may spend (audio + input + output; default 100000, 0 = unlimited)",
    )
    k.add_argument(
        "--expires-days", type=float, default=180, help="days until the key expires (default 180, 0 = never)"
    )
    k.add_argument("--rpm", type=int, default=None, help="requests per minute (default: unlimited)")
    k.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at once (default: unlimited)")
    k.set_defaults(action=_keys_create)
    actions.add_parser("list", help="list keys with their balances").set_defaults(action=_keys_list)
    k = actions.add_parser("revoke", help="revoke a key")
    k.add_argument("key", help="key id or displayed prefix")
    k.set_defaults(action=_keys_revoke)
    k = actions.add_parser("usage", help="usage per key, from the ledger")
    k.add_argument("--key", default=None, help="only this key (id or prefix)")
    k.add_argument("--since", default=None, help="only requests since this date (YYYY-MM-DD)")
    k.set_defaults(action=_keys_usage)
    for action in actions.choices.values():
        add_arguments(action, ["home", "database"])
    keys.set_defaults(func=cmd_keys)


def _add_tiny_model(sub: Commands) -> None:
    p = sub.add_parser(
        "tiny-model",
        help="write a small random-weight Qwen2-Audio checkpoint (offline)",
        description="Write a deterministic random-weight Qwen2-Audio checkpoint that transformers loads "
        "unchanged. Tests, CI and offline demos run on it.",
        epilog="example: ting tiny-model ./tiny && ting serve --model ./tiny",
    )
    p.add_argument("dir", help="directory to write (created if missing)")
    p.add_argument(
        "--preset",
        choices=["tiny", "real-width", "7b"],
        default="tiny",
        help="tiny: test model with weights; real-width / 7b: real shapes, config only (benchmarks)",
    )
    p.add_argument("--layers", type=int, default=None, help="encoder and decoder layers (real-width default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    p.set_defaults(func=cmd_tiny_model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ting",
        description="Ting (听): a self-hosted server for Qwen2-Audio speaking the DashScope and OpenAI APIs.",
    )
    parser.add_argument("--version", action="version", version=f"ting {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_serve, _add_chat, _add_transcribe, _add_keys, _add_tiny_model):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
