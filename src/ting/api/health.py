"""Liveness, readiness and metrics. /health is 200 once the model is loaded and serving, 503 before (and after,
and while a dead engine process is being replaced). /metrics: Prometheus's text format (api/metrics.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ting.api.auth import bearer
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
    body["audio_cache"] = dataclasses.asdict(runtime.audio.cache_stats())
    if engine is not None:
        info = engine.describe()
        stats = engine.stats
        body.update(device=info.get("device"), dtype=info.get("dtype"), threads=info.get("threads"))
        body.update(running=stats.running, waiting=stats.waiting)
        body.update(steps=stats.steps, generated_tokens=stats.generated_tokens)  # tokens / steps: the mean batch
        body["cache"] = dataclasses.asdict(stats.cache)  # prefix keys and values reused, audio-encoder outputs kept
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


@router.get(
    "/metrics", summary="Prometheus metrics (with --metrics-key, or on an open server)", include_in_schema=False
)
async def metrics(request: Request) -> Response:
    runtime = runtime_of(request)
    await runtime.metrics_access.check(bearer(request))
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
