"""The OpenAI error envelope: {"error": {message, type, param, code}} in OpenAI's vocabulary and status codes.

Only OpenAI's words go out here: `type` and `code` come from the error's OpenAI fields (never DashScope's codes),
and `param` names the request field at fault wherever it is known.
"""

from __future__ import annotations

import json

from ting.api.streaming import retry_after
from ting.errors import InputTooLong, ModelNotFound, PayloadTooLarge, QuotaExhausted, TingError

# Errors whose field is known from their kind alone (others say it when raised: TingError(param=...)).
_PARAMS: tuple[tuple[type[TingError], str], ...] = ((ModelNotFound, "model"), (InputTooLong, "messages"))


def openai_status(exc: TingError) -> int:
    if isinstance(exc, QuotaExhausted):
        return 429  # OpenAI's insufficient_quota
    if isinstance(exc, PayloadTooLarge):
        return 413
    if isinstance(exc, ModelNotFound):
        return 404  # as OpenAI and vLLM answer an unknown model
    return exc.status


def openai_param(exc: TingError) -> str | None:
    if exc.param is not None:
        return exc.param
    return next((name for kind, name in _PARAMS if isinstance(exc, kind)), None)


def error_body(exc: TingError) -> dict[str, dict[str, str | None]]:
    message = exc.message
    if isinstance(exc, ModelNotFound) and message == ModelNotFound.default_message:
        message = "The model does not exist or you do not have access to it."
    return {"error": {"message": message, "type": exc.openai_type, "param": openai_param(exc), "code": exc.openai_code}}


def error_response(exc: TingError, request_id: str) -> tuple[int, dict[str, str], bytes]:
    body: dict[str, object] = {**error_body(exc), "request_id": request_id}
    headers = {"content-type": "application/json", **retry_after(exc)}
    return openai_status(exc), headers, json.dumps(body, ensure_ascii=False).encode()
