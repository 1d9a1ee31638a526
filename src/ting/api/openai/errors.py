"""The OpenAI error envelope: {"error": {message, type, param, code}} with OpenAI's status codes."""

from __future__ import annotations

import json

from ting.api.streaming import retry_after
from ting.errors import PayloadTooLarge, QuotaExhausted, TingError


def error_response(exc: TingError, request_id: str) -> tuple[int, dict[str, str], bytes]:
    status = exc.status
    if isinstance(exc, QuotaExhausted):
        status = 429  # OpenAI's insufficient_quota
    elif isinstance(exc, PayloadTooLarge):
        status = 413
    body = {"error": {"message": exc.message, "type": exc.openai_type, "param": None,
                      "code": exc.openai_code or exc.code}, "request_id": request_id}
    headers = {"content-type": "application/json", **retry_after(exc)}
    return status, headers, json.dumps(body, ensure_ascii=False).encode()
