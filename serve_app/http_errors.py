"""The one place where exceptions become HTTP responses (the JSON error shape of DESIGN.md)."""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from image_search.errors import ServiceError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # seconds, for 503 answers


def error_body(code: str, message: str, filename: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "filename": filename}}


def service_error_response(_: Request, exc: Exception) -> JSONResponse:
    # An error raised in another deployment arrives wrapped; its `cause` is the original.
    error = getattr(exc, "cause", None) or exc
    assert isinstance(error, ServiceError)
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s is not None else None
    return JSONResponse(
        error_body(error.code, error.message, error.filename), status_code=error.status, headers=headers
    )


def internal_error_response(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error", exc_info=exc)
    return JSONResponse(error_body("internal", "Something went wrong on our side."), status_code=500)
