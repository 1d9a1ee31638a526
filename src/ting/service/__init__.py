"""The use cases both wire protocols share: chat about audio (chat.py) and transcripts (transcription.py)."""

from __future__ import annotations

from ting.service.chat import Call, ChatService, Generation, ModelLimits, Models, new_request_id
from ting.service.transcription import (
    Segment,
    Transcript,
    TranscriptionService,
    clean_transcript,
    join_windows,
    transcription_call,
)

__all__ = ["Call", "ChatService", "Generation", "ModelLimits", "Models", "Segment", "Transcript",
           "TranscriptionService", "clean_transcript", "join_windows", "new_request_id",
           "transcription_call"]
