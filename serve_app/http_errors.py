"""The one place where exceptions become HTTP responses (the JSON error shape of DESIGN.md)."""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from serve_app.errors import ClientError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


def error_body(code: str, message: str, filename: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "filename": filename}}


def client_error_response(_: Request, exc: Exception) -> JSONResponse:
    # A ClientError raised in another deployment arrives wrapped; its `cause` is the original.
    error = getattr(exc, "cause", None) or exc
    assert isinstance(error, ClientError)
    return JSONResponse(error_body(error.code, error.message, error.filename), status_code=error.status)


def overloaded_response(_: Request | None = None, exc: Exception | None = None) -> JSONResponse:
    return JSONResponse(
        error_body("overloaded", "The service is busy; try again in a moment."),
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def unavailable_response(_: Request | None = None, exc: Exception | None = None) -> JSONResponse:
    logger.warning("a downstream replica is unavailable: %s", type(exc).__name__ if exc else "?")
    return JSONResponse(
        error_body("unavailable", "The service is restarting a component; try again in a moment."),
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def internal_error_response(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error", exc_info=exc)
    return JSONResponse(error_body("internal", "Something went wrong on our side."), status_code=500)


def not_found_response(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(error_body("not_found", "No such page."), status_code=404)
