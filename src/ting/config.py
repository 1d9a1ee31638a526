"""Settings: each field is also a command-line flag `--x-y` and an environment variable `TING_X_Y`.

Precedence: flag > environment > default. List-valued fields take a repeated flag or a comma-separated
environment value.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

DEFAULT_MODEL = "Qwen/Qwen2-Audio-7B-Instruct"
MiB = 1024 * 1024


def default_home() -> Path:
    """Where Ting keeps its database and uploaded files: $TING_HOME, else the user's data directory."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "ting"


def _opt(default: Any, help: str, *, env: str | None = None, secret: bool = False, **kw: Any) -> Any:
    meta = {"help": help, "env": env, "secret": secret}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class Settings:
    # --- model and device
    model: str = _opt(
        DEFAULT_MODEL,
        "Checkpoint directory or Hugging Face hub id; 'tiny' builds and "
        "serves the offline random-weight test checkpoint.",
    )
    device: str = _opt("auto", "Where the model runs: auto, cpu, cuda, cuda:N.")
    dtype: str = _opt("auto", "Weights dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16.")
    served_model_name: tuple[str, ...] = _opt((), "Extra model names to serve (repeatable).")
    max_batch_size: int = _opt(16, "Most requests decoded together in one step (KV-cache slots).")
    max_queue: int = _opt(256, "Most requests waiting for a slot; past it requests get 503.")
    max_model_len: int = _opt(8192, "Most tokens (prompt + output) one request may hold.")
    prefix_caching: bool = _opt(
        True,
        "Keep finished requests' keys and values in free KV-cache slots and prefill only the new part of a "
        "prompt that begins the same way (a follow-up turn); only between requests of the same API key "
        "(--no-prefix-caching: off).",
    )
    prefix_cache_slots: int = _opt(
        0,
        "KV-cache slots beyond --max-batch-size that only keep finished requests for reuse (each costs a running "
        "slot's memory); 0: kept only in slots free at the moment.",
    )
    encoder_cache_mib: int = _opt(
        256, "MiB of audio-encoder outputs kept by the audio's content (a follow-up skips the encoder); 0: off."
    )
    load_format: str = _opt(
        "auto",
        "auto: the checkpoint's weights; dummy: random weights of the checkpoint's "
        "shapes (benchmarks; e.g. a `ting tiny-model --preset real-width` directory).",
    )
    engine_process: bool = _opt(
        True,
        "Run the model in a process of its own, restarted if it dies or hangs "
        "(--no-engine-process: on a thread of the server process, for debugging).",
    )
    engine_threads: int = _opt(
        0,
        "CPU threads for the model's operations in the engine process; 0: auto (1 when the model is on a GPU, as "
        "vLLM's workers do: more only spin on the cores the server needs; every core when the model is on the CPU).",
    )
    engine_hang_timeout_s: float = _opt(
        120.0,
        "Seconds without a decoding step, while requests are in flight, "
        "after which the engine process counts as hung and is restarted.",
    )
    engine_restart_timeout_s: float = _opt(
        600.0,
        "Seconds a restarted engine process may take to load the model before it is killed and tried again "
        "(the first start is not bounded: it may be downloading the weights).",
    )
    engine_max_backoff_s: float = _opt(
        30.0,
        "Longest wait before restarting an engine process that keeps dying "
        "(the wait doubles from 0.5 s with each death in a row).",
    )
    # --- HTTP
    host: str = _opt("127.0.0.1", "Address to listen on.")
    port: int = _opt(8000, "Port to listen on.")
    public_url: str = _opt(
        "",
        "Base URL clients reach this server at (e.g. https://ting.example.com); "
        "used for the upload host. Default: derived from each request.",
    )
    api_key: tuple[str, ...] = _opt(
        (),
        "A static API key clients must send (repeatable). With none "
        "configured and no keys in the database, any key is accepted.",
        secret=True,
    )
    metrics_key: str = _opt(
        "",
        "Bearer token that may read /metrics (Prometheus). Without it /metrics answers only while no API "
        "key exists (an open server, loopback only).",
        secret=True,
    )
    allow_no_auth: bool = _opt(False, "Allow listening beyond loopback with no API key configured.")
    cors_origins: tuple[str, ...] = _opt((), "Browser origins allowed to call the API (none by default).")
    allowed_hosts: tuple[str, ...] = _opt(
        (),
        "Host names a server without API keys answers to, besides localhost, "
        "IP addresses and --public-url's host (DNS-rebinding protection; '*' "
        "for any).",
    )
    max_request_bytes: int = _opt(32 * MiB, "Largest request body accepted, in bytes.")
    max_connections: int = _opt(
        1000,
        "Most open client connections. At the cap the one waiting longest for a "
        "request is closed to make room; if all are busy a new one gets 503.",
    )
    header_timeout_s: float = _opt(
        20.0,
        "Seconds a client has to send a request's headers (from connecting, or "
        "from the previous response); then 408 and the connection is closed.",
    )
    body_timeout_s: float = _opt(30.0, "Seconds of silence allowed while a request body is being sent.")
    keep_alive_s: float = _opt(5.0, "Seconds an idle keep-alive connection is kept open between requests.")
    heartbeat_s: float = _opt(15.0, "Seconds of silence after which a stream gets a keep-alive comment.")
    drain_timeout_s: float = _opt(30.0, "On shutdown, seconds to let in-flight requests finish.")
    log_level: str = _opt("info", "Log level: debug, info, warning, error.")
    docs: bool = _opt(
        False,
        "Serve Swagger UI at /docs. Off by default: its script and style come from a public "
        "CDN. /openapi.json is always served.",
    )
    # --- audio
    allow_media_hosts: tuple[str, ...] = _opt(
        (), "Host names, IPs or CIDRs that audio URLs may reach even though they are private (comma list)."
    )
    max_audio_bytes: int = _opt(10 * MiB, "Largest audio file (download, upload or decoded data URI).")
    max_audio_items: int = _opt(8, "Most audio items in one request.")
    fetch_connect_timeout_s: float = _opt(5.0, "Seconds to connect to an audio URL's host.")
    fetch_read_timeout_s: float = _opt(10.0, "Seconds of silence allowed while downloading audio.")
    fetch_timeout_s: float = _opt(20.0, "Seconds a whole audio download may take, redirects included.")
    fetch_concurrency: int = _opt(32, "Most audio downloads in flight at once.")
    decode_workers: int = _opt(2, "Audio decoder worker processes.")
    decode_timeout_s: float = _opt(10.0, "Seconds one audio item may take to decode.")
    decode_memory_mib: int = _opt(2048, "Address-space limit of each decoder worker, in MiB.")
    audio_cache_mib: int = _opt(
        256,
        "Memory for decoded audio clips kept for reuse (keyed by the audio's bytes; a follow-up turn about the same "
        "recording is not decoded again), in MiB; 0 turns the cache off.",
    )
    max_transcription_bytes: int = _opt(25 * MiB, "Largest file the transcription endpoints accept.")
    max_transcription_s: float = _opt(
        600.0, "Longest audio the transcription endpoints accept, in seconds (cut into 30 s windows)."
    )
    # --- storage
    home: str = _opt("", "Data directory (database, uploads). Default: $XDG_DATA_HOME/ting.")
    database: str = _opt(
        "",
        "Database URL: sqlite:///path or postgresql://user:pass@host/db. Default: SQLite in the data directory.",
        secret=True,
    )
    instance_id: str = _opt(
        "",
        "This server's name among replicas sharing a database. Default: host:port, so a "
        "restarted server releases what it left in flight at once.",
    )
    instance_heartbeat_s: float = _opt(
        10.0, "Seconds between this server's heartbeats in the database (how replicas tell it is alive)."
    )
    instance_timeout_s: float = _opt(
        45.0,
        "Seconds without a heartbeat after which a replica sharing the database is taken for dead and its "
        "requests in flight are released (charged nothing, recorded as interrupted). At least 3 heartbeats.",
    )
    require_oss_resolve: bool = _opt(
        True,
        "Refuse oss:// audio unless the request carries X-DashScope-OssResourceResolve: enable, as DashScope does.",
    )
    upload_ttl_s: float = _opt(48 * 3600.0, "Seconds an uploaded file is kept.")
    upload_max_bytes: int = _opt(100 * MiB, "Largest file the upload host accepts.")
    upload_quota_bytes: int = _opt(
        1024 * MiB, "Most bytes of uploaded files one API key keeps at once (files are kept --upload-ttl-s)."
    )
    max_concurrent_uploads: int = _opt(
        4, "Most uploads being received at once; past it an upload gets 503 before its file is read."
    )

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser() if self.home else default_home()

    @property
    def database_url(self) -> str:
        if self.database:
            return self.database
        return f"sqlite:///{self.home_path / 'ting.db'}"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from TING_* environment variables, then `overrides`."""
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        hints = get_type_hints(cls)
        for f in fields(cls):
            raw = environ.get(env_name(f))
            if raw is not None:
                values[f.name] = _parse(hints[f.name], raw, f.name)
        values.update(overrides)
        return cls(**values)


def env_name(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("env") or "TING_" + f.name.upper()


def _parse(hint: Any, raw: str, name: str) -> Any:
    if hint is bool:
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name}: expected true or false, got {raw!r}")
    if hint is int:
        return int(raw)
    if hint is float:
        return float(raw)
    if get_args(hint) and get_args(hint)[0] is str:  # tuple[str, ...]
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    return raw


def add_arguments(parser: argparse.ArgumentParser, names: list[str] | None = None) -> None:
    """Add `--x-y` flags for the named Settings fields (all when `names` is None)."""
    hints = get_type_hints(Settings)
    for f in fields(Settings):
        if names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} [env {env_name(f)}]"
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif get_args(hint):
            parser.add_argument(flag, dest=f.name, action="append", default=None, metavar="VALUE", help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=hint, default=None, metavar=f.name.upper(), help=help_text)


def from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    """Settings from the environment, overridden by flags the user gave."""
    overrides: dict[str, Any] = {}
    for f in fields(Settings):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if isinstance(value, list):  # repeated flag; each may itself be a comma list
            value = tuple(v.strip() for item in value for v in item.split(",") if v.strip())
        overrides[f.name] = value
    return Settings.from_env(environ, **overrides)
