"""Prometheus metrics at GET /metrics, in vLLM's and TGI's vocabulary where one exists (prefix `ting_`).

Where each number is counted (one place each):

* every HTTP request, as it ends: the access-log middleware (`request_done`), which sees what never reaches the
  request lifecycle too (a 401 on /v1/models, a body over the limit, a 503 while the model loads); refusals by
  the error that refused them (the app's error handler leaves it in the request's scope state);
* tokens and the per-request latencies: the request lifecycle, once per settled request (`settled`);
* audio fetch and decode durations and failures: the audio layer's observer (`fetched`, `decoded`);
* the engine's live state (running, waiting, KV slots, up, restarts): read at scrape time from the engine;
* the decoded-clip cache's counters: read at scrape time from the audio loader's cache.

Each server has a registry of its own (tests run several in one process). Who may read /metrics: see `Access`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import Scope

from ting.audio import CacheStats
from ting.engine import Engine, EngineClient
from ting.engine.backend import CacheStats as CacheCounters
from ting.engine.process import RemoteEngine
from ting.errors import AccessDenied, AuthError, TingError
from ting.service import Report, Settled, refusal_of

PREFIX = "ting_"
ERROR_STATE = "error"  # the scope state key under which the app's error handler leaves the TingError it rendered

# vLLM's buckets for TTFT and time per output token; e2e and audio buckets span what a request here can take.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0, 600.0)
AUDIO_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0)


def error_name(exc: BaseException) -> str:
    """A failure's label: the error's class (DownloadTimeout, InvalidAudio, ...); a fault of ours is InternalError."""
    return type(exc).__name__ if isinstance(exc, TingError) else "InternalError"


def endpoint_of(scope: Scope) -> str:
    """The route's path template (bounded: never the path a client made up); `other` for none."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    return "/playground" if scope.get("path", "").startswith("/playground") else "other"


def protocol_of(scope: Scope, report: Report | None) -> str:
    if report is not None and report.protocol:
        return report.protocol
    path: str = scope.get("path", "")
    if path.startswith(("/v1/", "/compatible-mode/")):
        return "openai"
    return "dashscope" if path.startswith("/api/v1/") else "none"


def outcome_from_status(status: int) -> str:
    if status == 499:
        return "aborted"
    return "ok" if status < 400 else "error"


class Metrics:
    """The server's metrics: one registry, fed by the middleware, the lifecycle, the audio layer and the engine."""

    def __init__(
        self, engine: Callable[[], EngineClient | None], kv_slots: int, audio_cache: Callable[[], CacheStats]
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            PREFIX + "requests",
            "HTTP requests, by protocol, route, status and outcome (ok, refused, error, aborted).",
            ["protocol", "endpoint", "status", "outcome"],
            registry=r,
        )
        self.refusals = Counter(
            PREFIX + "requests_refused",
            "Requests turned away before they ran, by reason: auth, quota, rate, concurrency, overload.",
            ["protocol", "reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens",
            "Prompt tokens of settled requests, by modality: text (with the chat template) and audio (billed).",
            ["protocol", "modality"],
            registry=r,
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Generated tokens of settled requests.", ["protocol"], registry=r
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Admission to settlement of each request the lifecycle admitted, by outcome.",
            ["protocol", "outcome"],
            buckets=E2E_BUCKETS_S,
            registry=r,
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Admission to the first generated token (audio fetch and decode included), chat requests.",
            ["protocol"],
            buckets=TTFT_BUCKETS_S,
            registry=r,
        )
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Per chat request with at least two output tokens: (last token - first token) / (output tokens - 1).",
            ["protocol"],
            buckets=TPOT_BUCKETS_S,
            registry=r,
        )
        self.fetch_s = Histogram(
            PREFIX + "audio_fetch_duration_seconds",
            "Reading one audio reference (download, data: URI, oss:// file), failures included.",
            ["source"],
            buckets=AUDIO_BUCKETS_S,
            registry=r,
        )
        self.fetch_failures = Counter(
            PREFIX + "audio_fetch_failures",
            "Audio references that could not be read, by source kind and error.",
            ["source", "error"],
            registry=r,
        )
        self.decode_s = Histogram(
            PREFIX + "audio_decode_duration_seconds",
            "Decoding one audio file in a worker process, failures included.",
            buckets=AUDIO_BUCKETS_S,
            registry=r,
        )
        self.decode_failures = Counter(
            PREFIX + "audio_decode_failures", "Audio files refused by the decoder, by error.", ["error"], registry=r
        )
        r.register(EngineCollector(engine, kv_slots))
        r.register(AudioCacheCollector(audio_cache))

    # --- the access-log middleware: every HTTP request --------------------------------------------------------

    def request_done(self, scope: Scope, status: int) -> None:
        state = scope.get("state", {})
        report = state.get("report")
        report = report if isinstance(report, Report) else None
        protocol = protocol_of(scope, report)
        refusal = refusal_of(state.get(ERROR_STATE))
        if refusal is not None:
            outcome = "refused"
            self.refusals.labels(protocol, refusal).inc()
        elif report is not None and report.outcome is not None:
            outcome = report.outcome
        else:
            outcome = outcome_from_status(status)
        self.requests.labels(protocol, endpoint_of(scope), str(status), outcome).inc()

    # --- the request lifecycle: each settled request ------------------------------------------------------------

    def settled(self, request: Settled) -> None:
        protocol, u = request.protocol, request.usage
        self.prompt_tokens.labels(protocol, "text").inc(u.input_tokens)
        self.prompt_tokens.labels(protocol, "audio").inc(u.audio_tokens)
        self.generation_tokens.labels(protocol).inc(u.output_tokens)
        self.e2e.labels(protocol, request.outcome).observe(request.latency_s)
        if request.first_token_s is not None:
            self.ttft.labels(protocol).observe(request.first_token_s)
        if request.decode_s is not None and u.output_tokens >= 2:
            self.tpot.labels(protocol).observe(request.decode_s / (u.output_tokens - 1))

    # --- the audio layer's observer -----------------------------------------------------------------------------

    def fetched(self, source: str, seconds: float, error: Exception | None) -> None:
        self.fetch_s.labels(source).observe(seconds)
        if error is not None:
            self.fetch_failures.labels(source, error_name(error)).inc()

    def decoded(self, seconds: float, error: Exception | None) -> None:
        self.decode_s.observe(seconds)
        if error is not None:
            self.decode_failures.labels(error_name(error)).inc()


class EngineCollector(Collector):
    """The engine's live state, read when Prometheus scrapes (the engine process sends it with every step)."""

    def __init__(self, engine: Callable[[], EngineClient | None], kv_slots: int) -> None:
        self.engine, self.kv_slots = engine, kv_slots  # kv_slots: --max-batch-size, until an engine says otherwise

    def collect(self) -> Iterable[Metric]:
        engine = self.engine()
        running = waiting = restarts = 0
        up, slots, cache = False, self.kv_slots, CacheCounters()
        if engine is not None:
            stats = engine.stats
            cache = stats.cache
            running, waiting, up = stats.running, stats.waiting, engine.alive
            if isinstance(engine, RemoteEngine):
                restarts, slots = engine.restarts, engine.options.max_batch_size
            elif isinstance(engine, Engine):
                slots = engine.scheduler.max_batch_size
        yield GaugeMetricFamily(PREFIX + "num_requests_running", "Requests in the engine's batch.", value=running)
        yield GaugeMetricFamily(
            PREFIX + "num_requests_waiting", "Requests waiting in the engine's queue for a slot.", value=waiting
        )
        # Each running request holds one KV-cache slot (a row of the slot cache) until it ends.
        yield GaugeMetricFamily(PREFIX + "kv_slots_used", "KV-cache slots held by running requests.", value=running)
        yield GaugeMetricFamily(PREFIX + "kv_slots_total", "KV-cache slots (--max-batch-size).", value=slots)
        yield GaugeMetricFamily(
            PREFIX + "kv_cache_usage_perc",
            "The fraction of KV-cache slots in use (0 to 1).",
            value=running / slots if slots else 0.0,
        )
        yield GaugeMetricFamily(PREFIX + "engine_up", "1 while the engine is serving, 0 otherwise.", value=int(up))
        yield from _prefix_cache(cache)
        yield CounterMetricFamily(
            PREFIX + "engine_restarts", "Engine processes started after the first (after a crash or hang).", restarts
        )


def _prefix_cache(c: CacheCounters) -> Iterable[Metric]:
    """The engine's caches (issue 12): prefix keys and values reused, audio-encoder outputs kept."""
    yield CounterMetricFamily(
        PREFIX + "prefix_cache_hits",
        "Prompts that began with keys and values still held (vLLM's prefix cache hits).",
        c.prefix_hits,
    )
    yield CounterMetricFamily(
        PREFIX + "prefix_cache_reused_tokens",
        "Prompt tokens not prefilled again, thanks to the prefix cache.",
        c.prefix_cached_tokens,
    )
    yield GaugeMetricFamily(
        PREFIX + "prefix_cache_entries", "Finished sequences held in free slots.", value=c.prefix_entries
    )
    yield CounterMetricFamily(
        PREFIX + "encoder_cache_hits", "Clips whose audio-encoder output was reused.", c.encoder_hits
    )
    yield GaugeMetricFamily(PREFIX + "encoder_cache_entries", "Audio-encoder outputs kept.", value=c.encoder_entries)
    yield GaugeMetricFamily(
        PREFIX + "encoder_cache_bytes", "Bytes of audio-encoder outputs kept.", value=c.encoder_bytes
    )


class AudioCacheCollector(Collector):
    """The decoded-clip cache (audio/cache.py), read when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], CacheStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        s = self.stats()
        name = PREFIX + "audio_cache_"
        yield CounterMetricFamily(name + "hits", "Audio clips reused instead of decoded (a 304 included).", s.hits)
        yield CounterMetricFamily(name + "misses", "Audio clips looked up and not found: decoded.", s.misses)
        yield CounterMetricFamily(name + "evictions", "Clips dropped to stay within the cache's bound.", s.evictions)
        yield CounterMetricFamily(
            name + "not_modified", "Conditional downloads the origin answered 304 (no body).", s.not_modified
        )
        yield GaugeMetricFamily(name + "entries", "Decoded clips kept.", value=s.entries)
        yield GaugeMetricFamily(name + "size_bytes", "Bytes of decoded clips kept.", value=s.size_bytes)
        yield GaugeMetricFamily(
            name + "capacity_bytes", "The cache's bound (--audio-cache-mib).", value=s.capacity_bytes
        )


class Access:
    """Who may read /metrics.

    With `--metrics-key` set: only a request carrying it (`Authorization: Bearer <key>`, Prometheus's
    `authorization` scrape setting). Without one: anyone while the server is open (no API key configured, so it
    answers only to loopback Host names), nobody once API keys exist: an API key is a client's, and the metrics
    describe every client's traffic.
    """

    def __init__(self, metrics_key: str, is_open: Callable[[], Awaitable[bool]]) -> None:
        self._digest = hashlib.sha256(metrics_key.encode()).digest() if metrics_key else None
        self._is_open = is_open

    async def check(self, token: str | None) -> None:
        if self._digest is not None:
            given = hashlib.sha256((token or "").encode()).digest()
            if token is None or not hmac.compare_digest(given, self._digest):
                raise AuthError("Invalid metrics key: /metrics needs the key given by --metrics-key.")
            return
        if not await self._is_open():
            raise AccessDenied("/metrics is off while API keys exist: start the server with --metrics-key.")
