"""The OpenAI protocol: chat completions, models, audio transcriptions and translations."""

from __future__ import annotations

from ting.api.openai.errors import error_response
from ting.api.openai.routes import router

__all__ = ["error_response", "router"]
