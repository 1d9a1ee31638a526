"""Liveness and readiness. /health is 200 once the model is loaded and serving, 503 before (and after, and
while a dead engine process is being replaced)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ting.api.runtime import runtime_of

router = APIRouter(tags=["Health"])


def _status(request: Request) -> tuple[int, dict[str, Any]]:
    runtime = runtime_of(request)
    engine = runtime.engine
    status = "ok" if runtime.ready else runtime.state
    if runtime.state == "ready" and not runtime.ready:
        status = "engine down"  # the engine process died or hung; a new one is being started
    body: dict[str, Any] = {"status": status, "model": runtime.settings.model}
    if runtime.state == "failed":
        body["error"] = runtime.error
    if engine is not None:
        info = engine.describe()
        stats = engine.stats
        body.update(device=info.get("device"), dtype=info.get("dtype"), running=stats.running, waiting=stats.waiting)
        body["cache"] = asdict(stats.cache)  # prefix keys and values reused, audio-encoder outputs kept
        restarts = getattr(engine, "restarts", None)  # the engine process
        if restarts is not None:
            body.update(engine_pid=getattr(engine, "pid", None), engine_restarts=restarts)
    return (200 if runtime.ready else 503), body


@router.get("/health", summary="200 once the model is loaded and serving, 503 before")
async def health(request: Request) -> JSONResponse:
    status, body = _status(request)
    return JSONResponse(body, status_code=status)


@router.get("/health/ready", summary="Same as /health")
async def ready(request: Request) -> JSONResponse:
    status, body = _status(request)
    return JSONResponse(body, status_code=status)


@router.get("/health/live", summary="200 while the process answers")
async def live() -> JSONResponse:
    return JSONResponse({"status": "alive"})
