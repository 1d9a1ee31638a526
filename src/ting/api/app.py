"""The FastAPI application: both protocols on one runtime."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Scope

from ting import __version__
from ting.api import dashscope, health, openai
from ting.api.hostguard import HostGuard, HostPolicy
from ting.api.middleware import BodyLimit, LargeBodyPacing, RequestContext
from ting.api.runtime import Runtime
from ting.config import Settings
from ting.engine import Engine, EngineClient, checkpoint_path
from ting.engine.process import EngineOptions, RemoteEngine
from ting.errors import IllegalJson, InvalidParameter, NotFound, TingError
from ting.service import ClientGone

log = logging.getLogger("ting.server")

OPENAI_PREFIXES = ("/v1/", "/compatible-mode/")
LARGE_BODY_BYTES = 256 * 1024  # bodies over this (or of no declared length) are read and parsed paced (middleware)
SIZE_ERRORS = ("string_too_long", "too_long")  # pydantic's error types for a broken size bound


def render_error(scope: Scope, exc: TingError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """An error in the envelope of the protocol the path belongs to."""
    request_id = scope.get("state", {}).get("request_id", "")
    path = scope.get("path", "")
    render = openai.error_response if path.startswith(OPENAI_PREFIXES) else dashscope.error_response
    status, headers, body = render(exc, request_id)
    return status, [(k.encode(), v.encode()) for k, v in headers.items()], body


def _response(request: Request, exc: TingError) -> Response:
    status, headers, body = render_error(request.scope, exc)
    return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})


def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors = exc.errors()
    # A size bound broken inside a union (text or list of parts) also fails the other branch: name the bound.
    first = next((e for e in errors if e.get("type") in SIZE_ERRORS), errors[0] if errors else {})
    if first.get("type") == "json_invalid" or (first.get("loc") == ("body",) and "dict" in first.get("msg", "")):
        return _response(request, IllegalJson())
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not _union_branch(str(p)))
    return _response(
        request,
        InvalidParameter(
            f"Required parameter(s) missing or invalid, please check the request "
            f"parameters. {where}: {first.get('msg', '')}".strip(),
            param=where or None,
        ),
    )


def _union_branch(part: str) -> bool:
    """pydantic's name for a branch of a union in an error's location (constrained-str, list[ContentItem])."""
    return part in ("str", "int", "float", "bool") or part.startswith(("constrained-", "list[", "dict["))


class _Playground(StaticFiles):
    """The web playground's static files, with a strict Content-Security-Policy (same origin only)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; media-src 'self' blob: data:; connect-src 'self'; img-src 'self' data:; "
            "frame-ancestors 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def _mount_playground(app: FastAPI) -> None:
    app.mount(
        "/playground",
        _Playground(directory=Path(__file__).resolve().parent.parent / "web", html=True),
        name="playground",
    )

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/playground/")


async def load_engine(settings: Settings) -> EngineClient:
    """The engine `ting serve` runs: in a process of its own, or (--no-engine-process) on a thread of this one."""
    dummy = settings.load_format == "dummy"
    if not settings.engine_process:
        engine = await asyncio.to_thread(
            Engine.load,
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            random_weights=dummy,
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            max_model_len=settings.max_model_len,
            prefix_caching=settings.prefix_caching,
            prefix_cache_slots=settings.prefix_cache_slots,
            encoder_cache_mib=settings.encoder_cache_mib,
            home=settings.home_path,
        )
        engine.start()
        return engine
    path = await asyncio.to_thread(checkpoint_path, settings.model, settings.home_path)
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
            hang_timeout_s=settings.engine_hang_timeout_s,
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


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    if runtime is None:
        runtime = Runtime(settings, load_engine=functools.partial(load_engine, settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.open()
        try:
            yield
        finally:
            await runtime.close()

    app = FastAPI(
        title="Ting",
        version=__version__,
        lifespan=lifespan,
        redoc_url=None,
        docs_url="/docs" if settings.docs else None,  # Swagger UI loads from a CDN: only when asked
        description="Self-hosted Qwen-Audio: the DashScope and OpenAI APIs on your own hardware.",
    )
    app.state.runtime = runtime
    app.include_router(dashscope.router)
    app.include_router(openai.router)
    app.include_router(health.router)
    _mount_playground(app)

    @app.exception_handler(TingError)
    async def ting_error(request: Request, exc: TingError) -> Response:
        return _response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _validation_error(request, exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return _response(request, NotFound(f"No such endpoint: {request.method} {request.url.path}"))
        error = TingError(str(exc.detail))
        error.status, error.code = exc.status_code, "InvalidParameter" if exc.status_code < 500 else "InternalError"
        return _response(request, error)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it; the access log does

    app.add_middleware(LargeBodyPacing, threshold_bytes=LARGE_BODY_BYTES)
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_request_bytes,
        per_path={dashscope.UPLOAD_PATH: settings.upload_max_bytes + 1024 * 1024},
        render=render_error,
    )
    app.add_middleware(
        HostGuard,
        policy=HostPolicy(
            allowed_hosts=settings.allowed_hosts, public_url=settings.public_url, cors_origins=settings.cors_origins
        ),
        is_open=runtime.store.keys.open,
        render=render_error,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            allow_credentials=False,
        )
    app.add_middleware(RequestContext, render=render_error)
    return app
