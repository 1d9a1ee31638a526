"""A stand-alone Python client for Ting (imports nothing from the server), sync and async.

    from ting.client import Client
    client = Client("http://127.0.0.1:8000", api_key="sk-...")
    answer = client.chat("What is said?", audio="speech.wav")
    print(answer.text)
    for delta in client.chat("And in French?", history=answer.messages, stream=True):
        print(delta.text, end="")
    print(client.transcribe("meeting.mp3", response_format="srt"))

    async with AsyncClient("http://127.0.0.1:8000", api_key="sk-...") as client:   # the same methods, awaited
        answer = await client.chat("What is said?", audio="speech.wav")
        async for delta in client.stream("And in French?", history=answer.messages):
            print(delta.text, end="")

Chat speaks the DashScope protocol (it works against the hosted API too); transcription uses the
Whisper-style endpoint. Local files up to 7 MB travel inline; larger ones go through the upload flow.
Requests answered 429 or 503 are sent again (max_retries, default 2) after the server's Retry-After.
"""

from __future__ import annotations

from ting.client._async import AsyncClient
from ting.client._common import (
    AuthenticationError,
    BadRequestError,
    ChatDelta,
    ChatResult,
    ConnectionFailed,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    RetryPolicy,
    Segment,
    ServerError,
    TingError,
    Transcript,
    Usage,
)
from ting.client._sync import Client

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "ChatDelta",
    "ChatResult",
    "Client",
    "ConnectionFailed",
    "NotFoundError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "RateLimitError",
    "RetryPolicy",
    "Segment",
    "ServerError",
    "TingError",
    "Transcript",
    "Usage",
]
