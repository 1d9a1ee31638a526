"""The OpenAI protocol: chat completions, models, audio transcriptions and translations."""

from __future__ import annotations

from fastapi import APIRouter

from ting.api.openai.errors import error_response

router = APIRouter()

__all__ = ["error_response", "router"]
