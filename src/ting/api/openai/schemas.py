"""OpenAI wire models: chat completions (with audio parts), models, audio transcriptions. Field names are
OpenAI's; `audio_url` parts are vLLM's form and URLs in `input_audio.data` are DashScope's extension."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ting.api.wire import check_request_json


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class InputAudio(_Open):
    data: str = Field(description="base64 audio, a data: URI, or an http(s) URL (DashScope's extension)")
    format: str | None = Field(None, description="wav, mp3, ... (only a hint: the container is sniffed)")


class AudioUrl(_Open):
    url: str


class ContentPart(_Open):
    type: str
    text: str | None = None
    input_audio: InputAudio | None = None
    audio_url: AudioUrl | str | None = None


class ChatMessage(_Open):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(_Open):
    include_usage: bool | None = None


class ChatCompletionRequest(_Open):
    @model_validator(mode="before")
    @classmethod
    def _wire_strings(cls, data: Any) -> Any:
        return check_request_json(data)

    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, description="extension (vLLM, DashScope)")
    repetition_penalty: float | None = Field(None, description="extension (vLLM, DashScope)")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    modalities: list[str] | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: str
    logprobs: None = None


class PromptTokensDetails(BaseModel):
    audio_tokens: int
    text_tokens: int


class CompletionTokensDetails(BaseModel):
    text_tokens: int


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[Choice]
    usage: CompletionUsage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ting"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class TranscriptionSegment(BaseModel):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int] = []
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0


class Transcription(BaseModel):
    text: str


class VerboseTranscription(BaseModel):
    task: str
    language: str
    duration: float
    text: str
    segments: list[TranscriptionSegment]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
