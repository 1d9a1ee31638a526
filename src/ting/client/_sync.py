"""The blocking client."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


class Client:
    """Talks to a Ting server (or the hosted DashScope API: same protocol).

    >>> client = Client("http://127.0.0.1:8000", api_key="sk-...")
    >>> client.chat("What is said?", audio="speech.wav").text
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, model: str = DEFAULT_MODEL,
                 timeout: float = 300.0) -> None:
        self.base_url = default_base_url(base_url)
        self.api_key = default_api_key(api_key)
        self.model = model
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0), trust_env=False)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise ConnectionFailed(f"cannot reach {self.base_url} ({type(exc).__name__}: {exc})") from None
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    def upload(self, audio: AudioInput) -> str:
        """Upload a file through the DashScope upload flow; returns its oss:// reference (kept 48 h)."""
        data, name = read_audio(audio)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        policy = self._send("GET", f"{self.base_url}/api/v1/uploads", headers=headers,
                            params={"action": "getPolicy", "model": self.model}).json()["data"]
        fields, reference = upload_fields(policy, name)
        self._send("POST", policy["upload_host"], data=fields, files={"file": (name, data)})
        return reference

    def _reference(self, audio: AudioInput) -> str:
        if is_reference(audio):
            return str(audio)
        data, _ = read_audio(audio)
        return data_uri(data) if len(data) <= INLINE_MAX_BYTES else self.upload(data)

    def chat(self, text: str | None = None, *, audio: AudioInput | Sequence[AudioInput] | None = None,
             history: list[dict[str, Any]] | None = None, system: str | None = None, stream: bool = False,
             model: str | None = None, **parameters: Any) -> ChatResult | Iterator[ChatDelta]:
        """Ask about audio. With stream=True, an iterator of deltas; else the whole answer.

        `history` is the `messages` of an earlier ChatResult (the conversation so far). `parameters` are the
        DashScope ones: max_tokens, temperature, top_p, top_k, seed, stop, repetition_penalty, ...
        """
        refs = [self._reference(a) for a in clips_of(audio)]
        messages, oss = conversation(history, system, text, refs)
        body = chat_body(model or self.model, messages, stream, parameters)
        headers = chat_headers(self.api_key, stream, oss)
        url = self.base_url + GENERATION_PATH
        if not stream:
            return parse_result(self._send("POST", url, json=body, headers=headers).json(), messages)
        return self._stream(url, body, headers)

    def _stream(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> Iterator[ChatDelta]:
        try:
            with self._http.stream("POST", url, json=body, headers=headers) as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_from_response(response)
                reader = EventReader()
                for line in response.iter_lines():
                    delta = reader.feed(line)
                    if delta is not None:
                        yield delta
        except httpx.HTTPError as exc:
            raise ConnectionFailed(f"cannot reach {self.base_url} ({type(exc).__name__}: {exc})") from None

    def transcribe(self, audio: AudioInput, *, language: str | None = None, prompt: str | None = None,
                   translate: bool = False, response_format: str = "json",
                   model: str | None = None) -> Transcript | str:
        """The words in a recording (OpenAI's Whisper-style endpoint). srt, vtt and text come back as strings."""
        data, name = read_audio(audio) if not is_reference(audio) else (_fetch(self._http, str(audio)), "audio")
        fields = {"model": model or self.model, "response_format": "verbose_json" if response_format == "json"
                  else response_format}
        if language and not translate:
            fields["language"] = language
        if prompt:
            fields["prompt"] = prompt
        task = "translations" if translate else "transcriptions"
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        response = self._send("POST", f"{self.base_url}/v1/audio/{task}", data=fields, files={"file": (name, data)},
                              headers=headers)
        body = response.text if fields["response_format"] in ("text", "srt", "vtt") else response.json()
        return parse_transcript(body, fields["response_format"])


def _fetch(http: httpx.Client, url: str) -> bytes:
    inline = inline_bytes(url)
    if inline is not None:
        return inline
    try:
        return http.get(url).raise_for_status().content
    except httpx.HTTPError as exc:
        raise ConnectionFailed(f"cannot download {url} ({type(exc).__name__})") from None

