"""The asyncio client: the same calls as Client, awaited."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from ting.client._common import (
    DEFAULT_MODEL,
    GENERATION_PATH,
    INLINE_MAX_BYTES,
    AudioInput,
    ChatDelta,
    ChatResult,
    ConnectionFailed,
    EventReader,
    Transcript,
    chat_body,
    chat_headers,
    clips_of,
    conversation,
    data_uri,
    default_api_key,
    default_base_url,
    error_from_response,
    inline_bytes,
    is_reference,
    parse_result,
    parse_transcript,
    read_audio,
    upload_fields,
)


class AsyncClient:
    """Talks to a Ting server (or the hosted DashScope API) from asyncio code."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, model: str = DEFAULT_MODEL,
                 timeout: float = 300.0) -> None:
        self.base_url = default_base_url(base_url)
        self.api_key = default_api_key(api_key)
        self.model = model
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), trust_env=False)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise ConnectionFailed(f"cannot reach {self.base_url} ({type(exc).__name__}: {exc})") from None
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    async def upload(self, audio: AudioInput) -> str:
        data, name = read_audio(audio)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        policy = (await self._send("GET", f"{self.base_url}/api/v1/uploads", headers=headers,
                                   params={"action": "getPolicy", "model": self.model})).json()["data"]
        fields, reference = upload_fields(policy, name)
        await self._send("POST", policy["upload_host"], data=fields, files={"file": (name, data)})
        return reference

    async def _reference(self, audio: AudioInput) -> str:
        if is_reference(audio):
            return str(audio)
        data, _ = read_audio(audio)
        return data_uri(data) if len(data) <= INLINE_MAX_BYTES else await self.upload(data)

    async def chat(self, text: str | None = None, *, audio: AudioInput | Sequence[AudioInput] | None = None,
                   history: list[dict[str, Any]] | None = None, system: str | None = None, model: str | None = None,
                   **parameters: Any) -> ChatResult:
        """The whole answer (see stream() for deltas)."""
        url, body, headers, messages = await self._prepare(text, audio, history, system, model, False, parameters)
        return parse_result((await self._send("POST", url, json=body, headers=headers)).json(), messages)

    async def stream(self, text: str | None = None, *, audio: AudioInput | Sequence[AudioInput] | None = None,
                     history: list[dict[str, Any]] | None = None, system: str | None = None, model: str | None = None,
                     **parameters: Any) -> AsyncIterator[ChatDelta]:
        """The answer as it is generated."""
        url, body, headers, _ = await self._prepare(text, audio, history, system, model, True, parameters)
        try:
            async with self._http.stream("POST", url, json=body, headers=headers) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise error_from_response(response)
                reader = EventReader()
                async for line in response.aiter_lines():
                    delta = reader.feed(line)
                    if delta is not None:
                        yield delta
        except httpx.HTTPError as exc:
            raise ConnectionFailed(f"cannot reach {self.base_url} ({type(exc).__name__}: {exc})") from None

    async def _prepare(self, text, audio, history, system, model, stream, parameters):  # type: ignore[no-untyped-def]
        refs = [await self._reference(a) for a in clips_of(audio)]
        messages, oss = conversation(history, system, text, refs)
        return (self.base_url + GENERATION_PATH, chat_body(model or self.model, messages, stream, parameters),
                chat_headers(self.api_key, stream, oss), messages)

    async def transcribe(self, audio: AudioInput, *, language: str | None = None, prompt: str | None = None,
                         translate: bool = False, response_format: str = "json",
                         model: str | None = None) -> Transcript | str:
        if is_reference(audio):
            data = inline_bytes(str(audio))
            if data is None:
                data = (await self._send("GET", str(audio))).content
            name = "audio"
        else:
            data, name = read_audio(audio)
        fields = {"model": model or self.model,
                  "response_format": "verbose_json" if response_format == "json" else response_format}
        if language and not translate:
            fields["language"] = language
        if prompt:
            fields["prompt"] = prompt
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        task = "translations" if translate else "transcriptions"
        response = await self._send("POST", f"{self.base_url}/v1/audio/{task}", data=fields,
                                    files={"file": (name, data)}, headers=headers)
        body = response.text if fields["response_format"] in ("text", "srt", "vtt") else response.json()
        return parse_transcript(body, fields["response_format"])
