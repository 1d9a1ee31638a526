"""What the sync and async clients share: errors, results, request bodies and response parsing."""

from __future__ import annotations

import base64
import email.utils
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_MODEL = "qwen-audio-turbo-latest"
INLINE_MAX_BYTES = 7 * 1024 * 1024  # larger files go through the upload flow (a data URI is limited to 10 MB)
GENERATION_PATH = "/api/v1/services/aigc/multimodal-generation/generation"

AudioInput = str | Path | bytes  # a URL (http, https, data, oss), a file path, or the file's bytes


class TingError(Exception):
    """An error answered by the server (or no answer at all). `code` is the DashScope/OpenAI error code;
    `retry_after` the seconds the server asked to wait (429 and 503), when it said."""

    retry_after: float | None = None

    def __init__(
        self, message: str, *, status: int | None = None, code: str | None = None, request_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.code, self.request_id = message, status, code, request_id

    def __str__(self) -> str:
        where = f"{self.status} {self.code}: " if self.status else ""
        return f"{where}{self.message}"


class ConnectionFailed(TingError):
    """The server could not be reached."""


class BadRequestError(TingError):
    """400: the request (or its audio) is wrong."""


class AuthenticationError(TingError):
    """401: no valid API key."""


class PermissionDeniedError(TingError):
    """403: the key may not do this (expired, ...)."""


class QuotaExceededError(PermissionDeniedError):
    """The key's token quota is spent."""


class NotFoundError(TingError):
    """404."""


class RateLimitError(TingError):
    """429: too many requests for this key; `retry_after` says when to try again."""


class ServerError(TingError):
    """5xx: the server failed or is overloaded (503) or still loading its model."""


def error_from(status: int, body: Any, text: str = "") -> TingError:
    """A typed error from an error response in either envelope."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        code, message, rid = err.get("code"), err.get("message") or text, body.get("request_id")
    elif isinstance(body, dict):
        code, message, rid = body.get("code"), body.get("message") or text, body.get("request_id")
    else:
        code, message, rid = None, text or f"HTTP {status}", None
    if status == 401:
        cls: type[TingError] = AuthenticationError
    elif status == 403 or code in ("AllocationQuota.FreeTierOnly", "insufficient_quota"):
        cls = (
            QuotaExceededError
            if code in ("AllocationQuota.FreeTierOnly", "insufficient_quota")
            else PermissionDeniedError
        )
    elif status == 404:
        cls = NotFoundError
    elif status == 429:
        cls = RateLimitError
    elif status >= 500:
        cls = ServerError
    else:
        cls = BadRequestError
    return cls(str(message), status=status, code=code, request_id=rid)


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0  # prompt text (and chat template) tokens
    output_tokens: int = 0
    audio_tokens: int = 0


@dataclass(frozen=True)
class ChatResult:
    text: str
    finish_reason: str
    usage: Usage
    request_id: str
    messages: list[dict[str, Any]] = field(default_factory=list)  # the conversation so far: pass as history


@dataclass(frozen=True)
class ChatDelta:
    text: str  # new text since the previous delta
    finish_reason: str | None  # None until the last one
    usage: Usage
    request_id: str


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Transcript:
    text: str
    segments: list[Segment]
    duration: float | None = None
    language: str | None = None


def default_api_key(api_key: str | None) -> str | None:
    return api_key or os.environ.get("TING_API_KEY") or os.environ.get("DASHSCOPE_API_KEY")


def default_base_url(base_url: str | None) -> str:
    return (base_url or os.environ.get("TING_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def is_reference(audio: AudioInput) -> bool:
    return isinstance(audio, str) and audio.startswith(("http://", "https://", "data:", "oss://"))


def read_audio(audio: AudioInput) -> tuple[bytes, str]:
    """The bytes of a local file (or bytes given), and a file name for them."""
    if isinstance(audio, bytes):
        return audio, "audio"
    path = Path(audio.removeprefix("file://") if isinstance(audio, str) else audio).expanduser()
    try:
        return path.read_bytes(), path.name
    except OSError as exc:
        raise BadRequestError(f"cannot read the audio file {path}: {exc.strerror}") from None


def inline_bytes(reference: str) -> bytes | None:
    """The bytes of a data: URI (None for a URL to download); oss:// cannot be read back."""
    if reference.startswith("data:"):
        return base64.b64decode(reference.split(",", 1)[1])
    if reference.startswith("oss://"):
        raise BadRequestError("transcribe needs the audio itself (a file, bytes or a URL), not an oss:// reference")
    return None


def data_uri(data: bytes) -> str:
    return "data:;base64," + base64.b64encode(data).decode("ascii")


def user_message(text: str | None, audio: Sequence[str]) -> dict[str, Any]:
    content: list[dict[str, str]] = [{"audio": a} for a in audio]
    if text:
        content.append({"text": text})
    if not content:
        raise BadRequestError("say something: give some text, some audio, or both")
    return {"role": "user", "content": content}


def chat_body(model: str, messages: list[dict[str, Any]], stream: bool, parameters: dict[str, Any]) -> dict[str, Any]:
    params = {k: v for k, v in parameters.items() if v is not None}
    params["result_format"] = "message"
    if stream:
        params["incremental_output"] = True
    return {"model": model, "input": {"messages": messages}, "parameters": params}


def chat_headers(api_key: str | None, stream: bool, oss: bool) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "User-Agent": "ting-client/0.1"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if stream:
        headers["X-DashScope-SSE"] = "enable"
    if oss:
        headers["X-DashScope-OssResourceResolve"] = "enable"
    return headers


def _usage(body: dict[str, Any]) -> Usage:
    u = body.get("usage") or {}
    return Usage(
        input_tokens=u.get("input_tokens", 0),
        output_tokens=u.get("output_tokens", 0),
        audio_tokens=u.get("audio_tokens", 0),
    )


def parse_result(body: dict[str, Any], messages: list[dict[str, Any]]) -> ChatResult:
    choice = body["output"]["choices"][0]
    text = "".join(c.get("text", "") for c in choice["message"]["content"])
    history = [*messages, {"role": "assistant", "content": [{"text": text}]}]
    return ChatResult(
        text=text,
        finish_reason=choice.get("finish_reason") or "stop",
        usage=_usage(body),
        request_id=body.get("request_id", ""),
        messages=history,
    )


class EventReader:
    """DashScope SSE, line by line -> deltas (the stream was asked for with incremental_output)."""

    def __init__(self) -> None:
        self.event = "result"

    def feed(self, line: str) -> ChatDelta | None:
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            body = json.loads(line[5:])
            if self.event == "error":
                raise error_from(500 if str(body.get("code", "")).startswith("Internal") else 400, body)
            choice = body["output"]["choices"][0]
            reason = choice.get("finish_reason")
            return ChatDelta(
                text="".join(c.get("text", "") for c in choice["message"]["content"]),
                finish_reason=None if reason in (None, "null") else reason,
                usage=_usage(body),
                request_id=body.get("request_id", ""),
            )
        return None


def error_from_response(response: httpx.Response) -> TingError:
    try:
        body = response.json()
    except ValueError:
        body = None
    error = error_from(response.status_code, body, response.text[:500])
    error.retry_after = retry_after_s(response.headers.get("retry-after"))
    return error


def retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds: a number of seconds, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


QUOTA_CODES = ("AllocationQuota.FreeTierOnly", "insufficient_quota")


@dataclass(frozen=True)
class RetryPolicy:
    """Which failed requests to send again, and after how long: 429 and 503 (a spent quota is no reason),
    at most `max_retries` times, waiting what Retry-After says (else `backoff_s`, doubling), never longer than
    `max_wait_s` (a longer Retry-After is given back to the caller at once)."""

    max_retries: int = 2
    max_wait_s: float = 30.0
    backoff_s: float = 0.5

    def delay_s(self, error: TingError, attempt: int) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None: raise `error`."""
        if attempt >= self.max_retries or error.status not in (429, 503) or error.code in QUOTA_CODES:
            return None
        delay = error.retry_after if error.retry_after is not None else self.backoff_s * 2**attempt
        return delay if delay <= self.max_wait_s else None


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def needs_upload(data: bytes) -> bool:
    """Too large to travel inline as a data: URI."""
    return len(data) > INLINE_MAX_BYTES


def unreachable(base_url: str, exc: Exception) -> ConnectionFailed:
    return ConnectionFailed(f"cannot reach {base_url} ({type(exc).__name__}: {exc})")


def download_failed(url: str, reason: str) -> ConnectionFailed:
    return ConnectionFailed(f"cannot download {url} ({reason})")


def transcription_request(
    model: str, response_format: str, language: str | None, prompt: str | None, translate: bool
) -> tuple[str, dict[str, str]]:
    """The endpoint path and form fields of a transcription (json is asked as verbose_json, for the segments)."""
    fields = {"model": model, "response_format": "verbose_json" if response_format == "json" else response_format}
    if language and not translate:
        fields["language"] = language
    if prompt:
        fields["prompt"] = prompt
    return f"/v1/audio/{'translations' if translate else 'transcriptions'}", fields


def transcript_of(response: httpx.Response, fields: dict[str, str]) -> Transcript | str:
    text_form = fields["response_format"] in ("text", "srt", "vtt")
    return parse_transcript(response.text if text_form else response.json(), fields["response_format"])


def clips_of(audio: AudioInput | Sequence[AudioInput] | None) -> list[AudioInput]:
    if audio is None:
        return []
    if isinstance(audio, (str, bytes, Path)):
        return [audio]
    return list(audio)


def conversation(
    history: list[dict[str, Any]] | None, system: str | None, text: str | None, references: list[str]
) -> tuple[list[dict[str, Any]], bool]:
    """The messages to send, and whether any refers to an upload (oss://)."""
    messages = list(history or [])
    if system and not messages:
        messages.append({"role": "system", "content": [{"text": system}]})
    messages.append(user_message(text, references))
    oss = any(
        str(c.get("audio", "")).startswith("oss://") for m in messages for c in m["content"] if isinstance(c, dict)
    )
    return messages, oss


def parse_transcript(body: Any, response_format: str) -> Transcript | str:
    if response_format in ("text", "srt", "vtt"):
        return str(body)
    segments = [Segment(s["start"], s["end"], s["text"]) for s in body.get("segments", [])]
    return Transcript(
        text=body["text"], segments=segments, duration=body.get("duration"), language=body.get("language")
    )


def upload_fields(policy: dict[str, Any], name: str) -> tuple[dict[str, str], str]:
    """The OSS form fields for an upload, and the oss:// reference it will have."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "audio"
    key = f"{policy['upload_dir']}/{safe}"
    fields = {
        "OSSAccessKeyId": policy["oss_access_key_id"],
        "Signature": policy["signature"],
        "policy": policy["policy"],
        "key": key,
        "x-oss-object-acl": policy["x_oss_object_acl"],
        "x-oss-forbid-overwrite": policy["x_oss_forbid_overwrite"],
        "success_action_status": "200",
    }
    return fields, f"oss://{key}"
