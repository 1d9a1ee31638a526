"""The DashScope native endpoint (contract §2): non-stream JSON, or SSE when X-DashScope-SSE: enable."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ting.api.auth import bearer
from ting.api.dashscope.convert import error_body, response_body, stream_frames, to_chat_request
from ting.api.dashscope.schemas import ErrorResponse, GenerationRequest, GenerationResponse
from ting.api.runtime import runtime_of
from ting.api.streaming import compact_json, event_stream, retry_after, until_disconnected
from ting.errors import EmptyInput, EmptyModel, TingError
from ting.service import Call
from ting.types import GenerationChunk

GENERATION_PATH = "/api/v1/services/aigc/multimodal-generation/generation"
SSE_MEDIA_TYPE = "text/event-stream;charset=UTF-8"

router = APIRouter(tags=["DashScope"])


@router.post(
    GENERATION_PATH,
    response_model=GenerationResponse,
    responses={
        400: {"model": ErrorResponse},
        401: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
        429: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
    },
    summary="Qwen-Audio multimodal generation (DashScope native)",
)
async def generation(request: Request, body: GenerationRequest) -> Response:
    if not body.model:
        raise EmptyModel()
    if body.input is None:
        raise EmptyInput()
    chat, incremental = to_chat_request(body)
    runtime = runtime_of(request)
    streaming = request.headers.get("x-dashscope-sse", "").strip().lower() == "enable"
    resolve = request.headers.get("x-dashscope-ossresourceresolve", "").strip().lower() == "enable"
    call = Call(
        chat,
        "dashscope",
        bearer(request),
        request.state.request_id,
        oss_resolve=resolve or not runtime.settings.require_oss_resolve,
        report=request.state.report,
    )
    gen = await runtime.service().start(call)
    if streaming:
        return StreamingResponse(
            event_stream(gen, _Frames(gen.request_id, incremental), runtime.settings.heartbeat_s),
            media_type=SSE_MEDIA_TYPE,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    async with gen:
        text = await until_disconnected(request, gen.text())
    return JSONResponse(response_body(text, gen.finish_reason, gen.usage, gen.request_id))


class _Frames:
    """SSE framed as DashScope frames it: id, event, an HTTP_STATUS comment, one data line; no [DONE]."""

    keepalive = b":keepalive\n\n"

    def __init__(self, request_id: str, incremental: bool) -> None:
        self.request_id, self.incremental = request_id, incremental
        self.n = 0
        self.text = ""

    def opening(self) -> Iterable[bytes]:
        return ()

    def chunk(self, chunk: GenerationChunk) -> Iterable[bytes]:
        self.text += chunk.text
        if not chunk.text and chunk.finish_reason is None:
            return  # a token that completed no character yet
        for data in stream_frames(
            chunk.text, self.text, chunk.finish_reason, chunk.usage, self.request_id, self.incremental
        ):
            yield self._frame("result", 200, data)

    def closing(self) -> Iterable[bytes]:
        return ()

    def error(self, exc: TingError) -> bytes:
        return self._frame("error", exc.status, error_body(exc.code, exc.message, self.request_id))

    def _frame(self, event: str, status: int, data: dict[str, Any]) -> bytes:
        self.n += 1
        return f"id:{self.n}\nevent:{event}\n:HTTP_STATUS/{status}\ndata:".encode() + compact_json(data) + b"\n\n"


def error_response(exc: TingError, request_id: str) -> tuple[int, dict[str, str], bytes]:
    """The native error envelope: {code, message, request_id}, always JSON (every SDK version parses it)."""
    headers = {"content-type": "application/json", **retry_after(exc)}
    return exc.status, headers, compact_json(error_body(exc.code, exc.message, request_id))
