"""OpenAI wire models: chat completions (with audio parts), models, audio transcriptions. Field names are
OpenAI's; `audio_url` parts are vLLM's form and URLs in `input_audio.data` are DashScope's extension."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ting.api.wire import check_request_json, model_name_problem
from ting.types import MAX_MESSAGES, MAX_PARTS, MAX_TEXT_CHARS

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class InputAudio(_Open):
    data: str = Field(description="base64 audio, a data: URI, or an http(s) URL (DashScope's extension)")
    format: str | None = Field(None, description="wav, mp3, ... (only a hint: the container is sniffed)")


class AudioUrl(_Open):
    url: str


class ContentPart(_Open):
    type: str
    text: Text | None = None
    input_audio: InputAudio | None = None
    audio_url: AudioUrl | str | None = None


class ChatMessage(_Open):
    role: str
    content: Text | Annotated[list[ContentPart], Field(max_length=MAX_PARTS)] | None = None


class StreamOptions(_Open):
    include_usage: bool | None = None


class ChatCompletionRequest(_Open):
    @model_validator(mode="before")
    @classmethod
    def _wire_strings(cls, data: Any) -> Any:
        return check_request_json(data)

    model: str
    messages: Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES)]
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
    cached_tokens: int = 0  # prompt tokens whose keys and values were reused (as OpenAI reports prompt caching)


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


class ChunkChoice(BaseModel):
    index: int
    delta: dict[str, str]
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One streamed event; `usage` is present (null until the last event) only with stream_options.include_usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


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


class DurationUsage(BaseModel):
    """Usage of audio billed by its length (whisper-1, verbose_json)."""

    type: Literal["duration"] = "duration"
    seconds: int


class InputTokenDetails(BaseModel):
    audio_tokens: int
    text_tokens: int


class TokenUsage(BaseModel):
    type: Literal["tokens"] = "tokens"
    input_tokens: int
    input_token_details: InputTokenDetails
    output_tokens: int
    total_tokens: int


class Transcription(BaseModel):
    """`json`; `verbose_json` is a VerboseTranscription, `text`, `srt` and `vtt` are plain text."""

    text: str
    usage: DurationUsage | TokenUsage


class VerboseTranscription(BaseModel):
    task: str
    language: str
    duration: float
    text: str
    segments: list[TranscriptionSegment]
    usage: DurationUsage


TranscriptionFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]
_LANGUAGE = re.compile(r"[a-zA-Z]{2,3}(-[a-zA-Z]{2,4})?")


class TranscriptionForm(BaseModel):
    """The fields of a Whisper-style form (/audio/transcriptions and /audio/translations) beside its `file`.

    An empty field is an absent one, as curl's `-F language=` means. Rules between fields (stream with a format,
    timestamp granularities) are convert.audio_form's."""

    model: str
    language: str | None = None  # transcriptions only: translations detect the source language
    prompt: str | None = None
    response_format: TranscriptionFormat = "json"
    temperature: float | None = None
    stream: bool = False
    timestamp_granularities: list[str] = Field(default=[], alias="timestamp_granularities[]")
    target_language: str | None = None  # translations: the language to translate into (an extension; "en")

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_absent(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            return value or None
        return value

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if problem := model_name_problem(value):
            raise ValueError(problem + ".")
        return value

    @field_validator("language")
    @classmethod
    def _language(cls, value: str | None) -> str | None:
        if value is not None and not _LANGUAGE.fullmatch(value):
            raise ValueError("language must be an ISO-639 code such as en, zh or yue.")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError("temperature must be between 0 and 1.")
        return value


class TranscriptTextDelta(BaseModel):
    type: Literal["transcript.text.delta"] = "transcript.text.delta"
    delta: str


class TranscriptTextDone(BaseModel):
    type: Literal["transcript.text.done"] = "transcript.text.done"
    text: str
    usage: TokenUsage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
