"""What the server holds for its lifetime: settings, store, audio loader, engine and the service joining them.

The model loads on a background thread, so /health can answer (503) while it does; requests before then
get 503 ModelUnavailable. Background housekeeping: the store heartbeat, crash recovery for PostgreSQL
replicas, and purging expired uploads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

from ting.audio import AudioLoader, Resolver, system_resolver
from ting.config import Settings
from ting.engine import Engine
from ting.errors import NotReady
from ting.service import ChatService, Models, TranscriptionService
from ting.store import HEARTBEAT_S, Store

log = logging.getLogger("ting.server")

PURGE_EVERY_S = 600.0


class Runtime:
    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        load_engine: Callable[[], Engine] | None = None,
        store: Store | None = None,
        resolver: Resolver = system_resolver,
    ) -> None:
        self.settings = settings
        self.store = store or Store(settings.database_url, home=settings.home_path, static_keys=settings.api_key,
                                    upload_ttl_s=settings.upload_ttl_s,
                                    instance_id=settings.instance_id or f"{socket.gethostname()}:{settings.port}")
        self.audio = AudioLoader.from_settings(settings, self.store.files, resolver=resolver)
        self.models = Models(settings.model, settings.served_model_name, settings.max_model_len)
        self.engine = engine
        self._load_engine = load_engine
        self._owns_engine = engine is None
        self._service: ChatService | None = None
        self.state = "starting"  # starting | loading | ready | failed | stopping
        self.error = ""
        self.started_at = time.time()
        self._tasks: list[asyncio.Task[Any]] = []
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's event loop, once open
        self.uploads_in_flight = 0  # form uploads being received (api/dashscope/uploads.py)

    def service(self) -> ChatService:
        if self._service is None or self.state != "ready":
            raise NotReady(retry_after_s=5)
        return self._service

    def transcription(self) -> TranscriptionService:
        return TranscriptionService(self.service())

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.engine is not None and self.engine.alive

    async def open(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.store.open(server=True)
        await self.audio.start()
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        if self.engine is not None:
            self._become_ready()
        else:
            self.state = "loading"
            self._tasks.append(asyncio.create_task(self._load()))

    async def _load(self) -> None:
        assert self._load_engine is not None
        try:
            self.engine = await asyncio.to_thread(self._load_engine)
        except Exception as exc:
            self.state, self.error = "failed", str(exc)
            log.error("the model could not be loaded: %s", exc)
            return
        self.engine.start()
        self._become_ready()

    def _become_ready(self) -> None:
        assert self.engine is not None
        if not self.engine.alive:
            self.engine.start()
        self._service = ChatService(self.settings, self.engine, self.audio, self.store, self.models)
        self.state = "ready"
        info = self.engine.describe()
        log.info("model ready: %s on %s (%s)", info.get("path", self.settings.model), info.get("device"),
                 info.get("dtype"))

    async def _housekeeping(self) -> None:
        last_purge = 0.0
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self.store.quota.heartbeat()
                if self.store.db.dialect == "postgresql":
                    await self.store.quota.recover()
                if time.monotonic() - last_purge > PURGE_EVERY_S:
                    await self.store.files.purge()
                    last_purge = time.monotonic()
            except Exception:
                log.exception("housekeeping failed")

    async def close(self) -> None:
        self.state = "stopping"
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._service is not None:
            await self._service.drain()
        if self.engine is not None and self._owns_engine:
            await asyncio.to_thread(self.engine.stop)
        await self.audio.close()
        await self.store.close()


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime
