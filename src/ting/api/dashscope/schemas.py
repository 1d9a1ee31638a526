"""DashScope wire models (dashscope-contract.md §2). Field names are DashScope's; unknown fields are kept
and ignored, as the hosted API does."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ting.api.wire import check_request_json
from ting.types import MAX_MESSAGES, MAX_PARTS, MAX_TEXT_CHARS

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentItem(_Open):
    text: Text | None = None
    audio: str | None = Field(None, description="http(s) URL, data:;base64 URI, or oss:// key of an upload")


class InputMessage(_Open):
    role: str = Field(description="system, user or assistant")
    content: Text | Annotated[list[ContentItem], Field(max_length=MAX_PARTS)]


class GenerationInput(_Open):
    messages: Annotated[list[InputMessage], Field(max_length=MAX_MESSAGES)] | None = None


class GenerationParameters(_Open):
    result_format: str | None = Field(None, description="always answered in message form")
    incremental_output: bool | None = Field(None, description="stream deltas (true) or the whole text so far")
    temperature: float | None = Field(None, description="[0, 2)")
    top_p: float | None = Field(None, description="(0, 1]")
    top_k: int | None = Field(None, description=">= 0; 0, null or > 100 disables it")
    seed: int | None = Field(None, description="[0, 2^31 - 1]")
    max_tokens: int | None = Field(None, description="[1, the model's maximum output]")
    max_length: int | None = Field(None, description="the Java SDK's maxLength: max_tokens when that is absent")
    repetition_penalty: float | None = Field(None, description="> 0, 1.0 is none")
    presence_penalty: float | None = Field(None, description="[-2, 2]")
    stop: str | list[str] | list[int] | None = None
    n: int | None = None
    tools: list[Any] | None = None


class GenerationRequest(_Open):
    @model_validator(mode="before")
    @classmethod
    def _wire_strings(cls, data: Any) -> Any:
        return check_request_json(data)

    model: str | None = None
    input: GenerationInput | None = None
    parameters: GenerationParameters | None = None


class TextContent(BaseModel):
    text: str


class OutputMessage(BaseModel):
    role: str = "assistant"
    content: list[TextContent]


class Choice(BaseModel):
    finish_reason: str
    message: OutputMessage


class Output(BaseModel):
    choices: list[Choice]


class GenerationUsage(BaseModel):
    audio_tokens: int
    output_tokens: int
    input_tokens: int


class GenerationResponse(BaseModel):
    """The non-stream body; fields in the hosted API's order (contract §2.5), which is the order of the bytes."""

    output: Output
    usage: GenerationUsage
    request_id: str


# One stream event's data: the same content in the order the contract's capture has it (§2.6).


class StreamChoice(BaseModel):
    message: OutputMessage
    finish_reason: str  # "null" until the last event


class StreamOutput(BaseModel):
    choices: list[StreamChoice]


class StreamUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    audio_tokens: int


class StreamEvent(BaseModel):
    output: StreamOutput
    usage: StreamUsage
    request_id: str


class ErrorResponse(BaseModel):
    code: str
    message: str
    request_id: str
