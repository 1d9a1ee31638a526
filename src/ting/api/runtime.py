"""The composition root: what the server holds for its lifetime (settings, store, audio loader, engine and the
services joining them), each built here from the Settings and handed plain values.

The model loads on a background thread, so /health can answer (503) while it does; requests before then
get 503 ModelUnavailable. Background housekeeping: the store heartbeat, crash recovery for PostgreSQL
replicas, and purging expired uploads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request

from ting.api.metrics import Access, Metrics
from ting.audio import (
    AudioCache,
    AudioLoader,
    AudioObserver,
    AudioSources,
    DecoderPool,
    HttpFetcher,
    MediaGuard,
    ObjectStore,
    Resolver,
    system_resolver,
)
from ting.config import Settings
from ting.engine import Engine, EngineClient
from ting.engine.process import EngineOptions, RemoteEngine
from ting.errors import NotReady
from ting.service import ChatService, Lifecycle, Models, TranscriptionService
from ting.store import Store

log = logging.getLogger("ting.server")

TINY = "tiny"  # --model tiny: the offline random-weight checkpoint, built under the home directory on first use
PURGE_EVERY_S = 600.0
CUT_SETTLE_S = 10.0  # after the drain time, how long requests that were cut get to send their error and settle


class Runtime:
    def __init__(
        self,
        settings: Settings,
        *,
        engine: EngineClient | None = None,
        load_engine: Callable[[], EngineClient] | Callable[[], Awaitable[EngineClient]] | None = None,
        store: Store | None = None,
        resolver: Resolver = system_resolver,
    ) -> None:
        self.settings = settings
        self.store = store or Store(
            settings.database_url,
            home=settings.home_path,
            static_keys=settings.api_key,
            upload_ttl_s=settings.upload_ttl_s,
            instance_id=settings.instance_id or f"{socket.gethostname()}:{settings.port}",
            instance_timeout_s=settings.instance_timeout_s,
        )
        # Read at scrape time: the metrics exist before the parts they observe (the audio loader reports to them).
        self.metrics = Metrics(lambda: self.engine, settings.max_batch_size, lambda: self.audio.cache_stats())
        self.metrics_access = Access(settings.metrics_key, self.store.keys.open)
        self.audio = _audio_loader(settings, self.store.files, resolver, self.metrics)
        self.models = Models(settings.model, settings.served_model_name, settings.max_model_len)
        self.engine = engine
        self._load_engine = load_engine or functools.partial(load_engine_for, settings)
        self._owns_engine = engine is None
        self.lifecycle = Lifecycle(self.store, self.metrics)
        self._service: ChatService | None = None
        self._transcription: TranscriptionService | None = None
        self.state = "starting"  # starting | loading | ready | failed | draining | stopping
        self.drain_clean = True  # False once requests had to be cut at the end of the drain
        self.error = ""
        self.started_at = time.time()
        self._tasks: list[asyncio.Task[Any]] = []
        self._draining: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's event loop, once open
        self.uploads_in_flight = 0  # form uploads being received (api/dashscope/uploads.py)

    def service(self) -> ChatService:
        if self._service is None or self.state != "ready":
            raise NotReady(retry_after_s=5)
        return self._service

    def transcription(self) -> TranscriptionService:
        self.service()  # ready, or NotReady
        assert self._transcription is not None
        return self._transcription

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.engine is not None and self.engine.alive

    async def open(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.store.open(server=True)
        await self.audio.start()
        self._tasks.append(asyncio.create_task(self._heartbeat()))
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        if self.engine is not None:
            self._become_ready()
        else:
            self.state = "loading"
            self._tasks.append(asyncio.create_task(self._load()))

    async def _load(self) -> None:
        """Load the engine: an async loader (the engine process) on the loop, a plain one on a thread."""
        assert self._load_engine is not None
        try:
            if inspect.iscoroutinefunction(self._load_engine):
                self.engine = await self._load_engine()
            else:
                self.engine = await asyncio.to_thread(self._load_engine)  # type: ignore[arg-type]
        except Exception as exc:
            self.state, self.error = "failed", str(exc)
            log.error("the model could not be loaded: %s", exc)
            return
        self._become_ready()

    def _become_ready(self) -> None:
        assert self.engine is not None
        start = getattr(self.engine, "start", None)  # an in-process Engine runs once started
        if not self.engine.alive and start is not None:
            start()
        self._service = ChatService(
            self.lifecycle, self.engine, self.audio, self.models, max_audio_items=self.settings.max_audio_items
        )
        self._transcription = TranscriptionService(
            self.lifecycle, self.engine, self.audio, self.models, max_seconds=self.settings.max_transcription_s
        )
        self.state = "ready"
        info = self.engine.describe()
        log.info(
            "model ready: %s on %s (%s)", info.get("path", self.settings.model), info.get("device"), info.get("dtype")
        )

    async def _heartbeat(self) -> None:
        """Tell replicas this server is alive: a task of its own, so that slow housekeeping never delays it."""
        while True:
            await asyncio.sleep(self.settings.instance_heartbeat_s)
            try:
                await self.store.quota.heartbeat()
            except Exception:
                log.exception("heartbeat failed")

    async def _housekeeping(self) -> None:
        last_purge = 0.0
        while True:
            await asyncio.sleep(self.settings.instance_heartbeat_s)
            try:
                if self.store.db.dialect == "postgresql":
                    await self.store.quota.recover()
                if time.monotonic() - last_purge > PURGE_EVERY_S:
                    await self.store.files.purge()
                    last_purge = time.monotonic()
            except Exception:
                log.exception("housekeeping failed")

    def begin_drain(self) -> None:
        """SIGTERM: refuse new requests (readiness turns false), let those in flight finish for the drain time,
        then cut what is left: each gets the protocol's error and is settled with what it used."""
        if self.state in ("draining", "stopping"):
            return
        self.state = "draining"
        self._draining = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        timeout_s = self.settings.drain_timeout_s
        if await self.lifecycle.wait_idle(timeout_s):
            return
        self.drain_clean = False
        log.warning(
            "the drain took over %g s: cutting the %d requests still in flight", timeout_s, len(self.lifecycle.open)
        )
        await self._stop_engine()  # each request in it ends with ShuttingDown
        if not await self.lifecycle.wait_idle(CUT_SETTLE_S):
            log.error("%d requests were not settled after the cut", len(self.lifecycle.open))

    async def _stop_engine(self) -> None:
        """Stop an engine this runtime started (again: a no-op); requests still in it end with ShuttingDown."""
        if self.engine is None or not self._owns_engine:
            return
        aclose = getattr(self.engine, "aclose", None)  # the engine process
        if aclose is not None:
            await aclose()
        else:
            await asyncio.to_thread(self.engine.stop)  # type: ignore[attr-defined]

    async def close(self) -> None:
        if self._draining is not None:
            with contextlib.suppress(BaseException):
                await self._draining  # requests are settled before the store closes
        self.state = "stopping"
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        await self.lifecycle.drain()
        await self._stop_engine()
        await self.audio.close()
        await self.store.close()


def _audio_loader(
    settings: Settings, store: ObjectStore, resolver: Resolver, observer: AudioObserver | None = None
) -> AudioLoader:
    fetcher = HttpFetcher(
        MediaGuard(settings.allow_media_hosts),
        max_bytes=settings.max_audio_bytes,
        connect_timeout_s=settings.fetch_connect_timeout_s,
        read_timeout_s=settings.fetch_read_timeout_s,
        total_timeout_s=settings.fetch_timeout_s,
        concurrency=settings.fetch_concurrency,
        resolver=resolver,
    )
    pool = DecoderPool(
        settings.decode_workers, timeout_s=settings.decode_timeout_s, memory_mib=settings.decode_memory_mib
    )
    cache = AudioCache(settings.audio_cache_mib * 1024 * 1024)
    return AudioLoader(AudioSources(fetcher, store, max_bytes=settings.max_audio_bytes), pool, cache, observer)


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def checkpoint_path(model: str, home: Path) -> str:
    """`model` as given, or for 'tiny' the offline test checkpoint under `home` (built on first use)."""
    if model != TINY:
        return model
    from ting.engine import tiny

    target = home / "models" / "tiny"
    if not (target / "config.json").exists():
        tiny.build(target)
    return str(target)


async def load_engine_for(settings: Settings) -> EngineClient:
    """The engine `ting serve` runs: in a process of its own, or (--no-engine-process) on a thread of this one."""
    path = await asyncio.to_thread(checkpoint_path, settings.model, settings.home_path)
    dummy = settings.load_format == "dummy"
    if not settings.engine_process:
        engine = await asyncio.to_thread(
            Engine.load,
            path,
            device=settings.device,
            dtype=settings.dtype,
            random_weights=dummy,
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            max_model_len=settings.max_model_len,
            prefix_caching=settings.prefix_caching,
            prefix_cache_slots=settings.prefix_cache_slots,
            encoder_cache_mib=settings.encoder_cache_mib,
        )
        engine.use_threads(settings.engine_threads)
        engine.start()
        return engine
    remote = RemoteEngine(
        EngineOptions(
            path=path,
            device=settings.device,
            dtype=settings.dtype,
            random_weights=dummy,
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            max_model_len=settings.max_model_len,
            prefix_caching=settings.prefix_caching,
            prefix_cache_slots=settings.prefix_cache_slots,
            encoder_cache_mib=settings.encoder_cache_mib,
            threads=settings.engine_threads,
            hang_timeout_s=settings.engine_hang_timeout_s,
            restart_timeout_s=settings.engine_restart_timeout_s,
            max_backoff_s=settings.engine_max_backoff_s,
            log_level=settings.log_level,
        )
    )
    try:
        await remote.open()
    except BaseException:
        await remote.aclose()
        raise
    return remote
