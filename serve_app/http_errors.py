"""The one place where exceptions become HTTP responses (the JSON error shape of DESIGN.md).

- `ServiceError`s (ours, raised where found, possibly in another deployment) keep their status,
  code and Retry-After.
- Starlette's `HTTPException`s (unknown route, wrong method) get the same JSON shape.
- Anything else is a bug or a fault on our side: logged with its traceback, answered 500 in JSON.
  That last mapping is a middleware (`InternalErrorMiddleware`) rather than an `Exception`
  handler: Starlette runs an `Exception` handler in `ServerErrorMiddleware`, outside every user
  middleware, so the request counter would never see those 500s.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from image_search.errors import ServiceError

logger = logging.getLogger("ray.serve")

HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}
# nginx's "client closed request": recorded (metrics) for a client that left mid-request; it never
# reaches anyone, and it is not our error (no traceback, not a 500).
CLIENT_CLOSED_STATUS = 499


def error_body(code: str, message: str, filename: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "filename": filename}}


def original_error(exc: BaseException) -> BaseException:
    """An error raised in another deployment arrives wrapped (RayTaskError); its `cause` is the original."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def service_error_response(error: ServiceError, extra: dict[str, Any] | None = None) -> JSONResponse:
    """The JSON answer for one of our errors; `extra` adds top-level keys (e.g. per-query results)."""
    # An error may carry headers of its own (401's WWW-Authenticate); Retry-After from its retry_after_s.
    headers = dict(getattr(error, "headers", None) or {})
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(error.retry_after_s)
    body = {**error_body(error.code, error.message, error.filename), **(extra or {})}
    return JSONResponse(body, status_code=error.status, headers=headers or None)


def handle_service_error(_: Request, exc: Exception) -> Response:
    error = original_error(exc)
    if not isinstance(error, ServiceError):
        # Registered for ServiceError only, but a wrapped error's cause is checked, not assumed.
        return internal_error_response(exc)
    return service_error_response(error)


def handle_http_exception(_: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else ""
    return JSONResponse(error_body(HTTP_ERROR_CODES.get(status, "http_error"), str(detail)), status_code=status)


def internal_error_response(exc: BaseException) -> JSONResponse:
    logger.error("unexpected error while answering a request", exc_info=exc)
    return JSONResponse(error_body("internal", "Something went wrong on our side."), status_code=500)


EXCEPTION_HANDLERS = {ServiceError: handle_service_error, HTTPException: handle_http_exception}


class ResponseStartTracker:
    """Wraps an ASGI `send` and remembers whether the response has started (headers sent)."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)


class InternalErrorMiddleware:
    """Answer any exception that escaped the routes and handlers with a JSON 500 (and log it).

    Placed inside the request counter, so every 500 is counted like any other status.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracker = ResponseStartTracker(send)

        async def receive_or_closed() -> Message:
            # Serve's replica reads the body from its proxy: when the client goes, that read raises
            # (ray.exceptions.TaskCancelledError), not Starlette's ClientDisconnect. Either way the
            # client closed the request; a failed read of its body is never our error.
            try:
                return await receive()
            except Exception as exc:
                raise ClientDisconnect() from exc

        try:
            await self.app(scope, receive_or_closed, tracker)
        except ClientDisconnect:
            # The client left mid-upload (the page does this when a newer search supersedes one).
            logger.info("client closed the connection before its request was read: %s", scope.get("path"))
            if not tracker.started:
                body = error_body("client_closed", "The client closed the connection.")
                await JSONResponse(body, status_code=CLIENT_CLOSED_STATUS)(scope, receive, send)
        except asyncio.CancelledError:
            # Serve cancels a request whose client went away (or that ran past request_timeout_s); which of
            # the two races the body read above, so a client leaving mid-upload may end here instead.
            logger.info("request cancelled: the client closed the connection or it timed out: %s", scope.get("path"))
            raise
        except Exception as exc:
            if tracker.started:  # headers are out: nothing sensible can follow; let the server close it
                raise
            await internal_error_response(exc)(scope, receive, send)
