"""The use cases both wire protocols share: chat about audio (chat.py) and transcripts (transcription.py), on one
request lifecycle (lifecycle.py: admission, outcome, settlement)."""

from __future__ import annotations

from ting.service.chat import ChatService, Generation, ModelLimits, Models
from ting.service.lifecycle import (
    Call,
    ClientGone,
    Lifecycle,
    LifecycleObserver,
    Report,
    Settled,
    Ticket,
    outcome_of,
    refusal_of,
)
from ting.service.transcription import (
    Segment,
    Transcript,
    TranscriptionService,
    clean_transcript,
    join_windows,
    transcription_call,
)

__all__ = [
    "Call",
    "ChatService",
    "ClientGone",
    "Generation",
    "Lifecycle",
    "LifecycleObserver",
    "ModelLimits",
    "Models",
    "Report",
    "Segment",
    "Settled",
    "Ticket",
    "Transcript",
    "TranscriptionService",
    "clean_transcript",
    "join_windows",
    "outcome_of",
    "refusal_of",
    "transcription_call",
]
