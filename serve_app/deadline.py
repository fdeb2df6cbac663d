"""An end-to-end deadline for every request, that no request header can lift."""

from __future__ import annotations

import asyncio

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.http_errors import RETRY_AFTER_S, error_body


class DeadlineMiddleware:
    """Answer 503 `timeout` when a request is not done within `timeout_s` (reading the body included).

    If the response has already started there is nothing sensible left to send; the connection
    is then just closed by cancelling the handler.
    """

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, tracking_send), self.timeout_s)
        except asyncio.TimeoutError:
            if started:
                raise
            response = JSONResponse(
                error_body("timeout", f"The request took longer than {self.timeout_s:g} s; try again."),
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
            await response(scope, receive, send)
