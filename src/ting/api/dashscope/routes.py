"""The DashScope native endpoint (contract §2): non-stream JSON, or SSE when X-DashScope-SSE: enable."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ting.api.auth import bearer
from ting.api.dashscope.convert import dumps, error_body, response_body, stream_frames, to_chat_request
from ting.api.dashscope.schemas import ErrorResponse, GenerationRequest, GenerationResponse
from ting.api.runtime import runtime_of
from ting.api.streaming import HEARTBEAT, shielded, until_disconnected, with_heartbeats
from ting.errors import EmptyInput, EmptyModel, TingError
from ting.service import Call, Generation

GENERATION_PATH = "/api/v1/services/aigc/multimodal-generation/generation"
SSE_MEDIA_TYPE = "text/event-stream;charset=UTF-8"

router = APIRouter(tags=["DashScope"])


@router.post(
    GENERATION_PATH,
    response_model=GenerationResponse,
    responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 403: {"model": ErrorResponse},
               429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
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
    call = Call(chat, "dashscope", bearer(request), request.state.request_id,
                oss_resolve=resolve or not runtime.settings.require_oss_resolve, log=request.state.access)
    gen = await runtime.service().start(call)
    if streaming:
        return StreamingResponse(_events(gen, incremental, runtime.settings.heartbeat_s), media_type=SSE_MEDIA_TYPE,
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        text = await until_disconnected(request, gen.text())
    finally:
        await shielded(gen.close)
    return JSONResponse(response_body(text, gen.finish_reason, gen.usage, gen.request_id))


async def _events(gen: Generation, incremental: bool, heartbeat_s: float) -> AsyncIterator[bytes]:
    """SSE framed as DashScope frames it: id, event, an HTTP_STATUS comment, one data line; no [DONE]."""
    n = 0
    text = ""
    try:
        async for item in with_heartbeats(gen, heartbeat_s):
            if item is HEARTBEAT:
                yield b":keepalive\n\n"
                continue
            chunk = item
            text += chunk.text
            if not chunk.text and chunk.finish_reason is None:
                continue  # a token that completed no character yet
            if chunk.finish_reason is not None:
                await shielded(gen.close)  # the ledger has it before the client sees the end
            for data in stream_frames(chunk.text, text, chunk.finish_reason, chunk.usage, gen.request_id, incremental):
                n += 1
                yield f"id:{n}\nevent:result\n:HTTP_STATUS/200\ndata:{dumps(data)}\n\n".encode()
    except TingError as exc:
        n += 1
        data = error_body(exc.code, exc.message, gen.request_id)
        yield f"id:{n}\nevent:error\n:HTTP_STATUS/{exc.status}\ndata:{dumps(data)}\n\n".encode()
    finally:
        await shielded(gen.close)


def error_response(exc: TingError, request_id: str) -> tuple[int, dict[str, str], bytes]:
    """The native error envelope: {code, message, request_id}, always JSON (every SDK version parses it)."""
    headers = {"content-type": "application/json"}
    if exc.retry_after_s:
        headers["retry-after"] = str(max(1, round(exc.retry_after_s)))
    return exc.status, headers, dumps(error_body(exc.code, exc.message, request_id)).encode()
