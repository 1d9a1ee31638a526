"""The DashScope protocol: schemas (wire models), convert (wire <-> domain), routes, uploads."""

from __future__ import annotations

from fastapi import APIRouter

from ting.api.dashscope import routes, uploads
from ting.api.dashscope.routes import GENERATION_PATH, error_response
from ting.api.dashscope.uploads import UPLOAD_PATH

router = APIRouter()
router.include_router(routes.router)
router.include_router(uploads.router)

__all__ = ["GENERATION_PATH", "UPLOAD_PATH", "error_response", "router"]
