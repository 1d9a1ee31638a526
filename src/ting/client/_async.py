"""The asyncio client: Client (_sync.py) awaited, with the same methods and the same behaviour."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from ting.client._common import (
    DEFAULT_MODEL,
    GENERATION_PATH,
    AudioInput,
    ChatDelta,
    ChatResult,
    EventReader,
    RetryPolicy,
    TingError,
    Transcript,
    auth_headers,
    chat_body,
    chat_headers,
    clips_of,
    conversation,
    data_uri,
    default_api_key,
    default_base_url,
    download_failed,
    error_from_response,
    inline_bytes,
    is_reference,
    needs_upload,
    parse_result,
    read_audio,
    transcript_of,
    transcription_request,
    unreachable,
    upload_fields,
)


class AsyncClient:
    """Talks to a Ting server (or the hosted DashScope API) from asyncio code. See Client."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        model: str = DEFAULT_MODEL,
        timeout: float = 300.0,
        max_retries: int = 2,
        max_retry_wait_s: float = 30.0,
    ) -> None:
        self.base_url = default_base_url(base_url)
        self.api_key = default_api_key(api_key)
        self.model = model
        self.retry = RetryPolicy(max_retries=max_retries, max_wait_s=max_retry_wait_s)
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), trust_env=False)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, url, **kwargs)
            except httpx.HTTPError as exc:
                raise unreachable(self.base_url, exc) from None
            if response.status_code < 400:
                return response
            await self._wait_or_raise(error_from_response(response), attempt)
            attempt += 1

    async def _wait_or_raise(self, error: TingError, attempt: int) -> None:
        delay_s = self.retry.delay_s(error, attempt)
        if delay_s is None:
            raise error
        await asyncio.sleep(delay_s)

    async def upload(self, audio: AudioInput) -> str:
        """Upload a file through the DashScope upload flow; returns its oss:// reference (kept 48 h)."""
        data, name = read_audio(audio)
        policy = (
            await self._send(
                "GET",
                f"{self.base_url}/api/v1/uploads",
                headers=auth_headers(self.api_key),
                params={"action": "getPolicy", "model": self.model},
            )
        ).json()["data"]
        fields, reference = upload_fields(policy, name)
        await self._send("POST", policy["upload_host"], data=fields, files={"file": (name, data)})
        return reference

    async def _reference(self, audio: AudioInput) -> str:
        if is_reference(audio):
            return str(audio)
        data, _ = read_audio(audio)
        return await self.upload(data) if needs_upload(data) else data_uri(data)

    async def chat(
        self,
        text: str | None = None,
        *,
        audio: AudioInput | Sequence[AudioInput] | None = None,
        history: list[dict[str, Any]] | None = None,
        system: str | None = None,
        stream: bool = False,
        model: str | None = None,
        **parameters: Any,
    ) -> ChatResult | AsyncIterator[ChatDelta]:
        """Ask about audio: the whole answer, or with stream=True the deltas (`async for d in await chat(...)`)."""
        if stream:
            return self.stream(text, audio=audio, history=history, system=system, model=model, **parameters)
        refs = [await self._reference(a) for a in clips_of(audio)]
        messages, oss = conversation(history, system, text, refs)
        body = chat_body(model or self.model, messages, False, parameters)
        response = await self._send(
            "POST", self.base_url + GENERATION_PATH, json=body, headers=chat_headers(self.api_key, False, oss)
        )
        return parse_result(response.json(), messages)

    async def stream(
        self,
        text: str | None = None,
        *,
        audio: AudioInput | Sequence[AudioInput] | None = None,
        history: list[dict[str, Any]] | None = None,
        system: str | None = None,
        model: str | None = None,
        **parameters: Any,
    ) -> AsyncIterator[ChatDelta]:
        """The answer as it is generated."""
        refs = [await self._reference(a) for a in clips_of(audio)]
        messages, oss = conversation(history, system, text, refs)
        body = chat_body(model or self.model, messages, True, parameters)
        headers = chat_headers(self.api_key, True, oss)
        attempt = 0
        while True:
            try:
                async with self._http.stream("POST", self.base_url + GENERATION_PATH, json=body, headers=headers) as r:
                    if r.status_code < 400:
                        reader = EventReader()
                        async for line in r.aiter_lines():
                            delta = reader.feed(line)
                            if delta is not None:
                                yield delta
                        return
                    await r.aread()
                    error = error_from_response(r)
            except httpx.HTTPError as exc:
                raise unreachable(self.base_url, exc) from None
            await self._wait_or_raise(error, attempt)
            attempt += 1

    async def transcribe(
        self,
        audio: AudioInput,
        *,
        language: str | None = None,
        prompt: str | None = None,
        translate: bool = False,
        response_format: str = "json",
        model: str | None = None,
    ) -> Transcript | str:
        """The words in a recording (OpenAI's Whisper-style endpoint). srt, vtt and text come back as strings."""
        data, name = (await self._download(str(audio)), "audio") if is_reference(audio) else read_audio(audio)
        path, fields = transcription_request(model or self.model, response_format, language, prompt, translate)
        response = await self._send(
            "POST", self.base_url + path, data=fields, files={"file": (name, data)}, headers=auth_headers(self.api_key)
        )
        return transcript_of(response, fields)

    async def _download(self, url: str) -> bytes:
        """The audio a URL (or data: URI) refers to, fetched here to be sent as the file."""
        inline = inline_bytes(url)
        if inline is not None:
            return inline
        try:
            response = await self._http.get(url)
        except httpx.HTTPError as exc:
            raise download_failed(url, type(exc).__name__) from None
        if response.status_code >= 400:
            raise download_failed(url, f"HTTP {response.status_code}")
        return response.content
