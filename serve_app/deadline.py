"""An end-to-end deadline for every request, that no request header can lift."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Receive, Scope, Send

from image_search.errors import Timeout
from serve_app.http_errors import ResponseStartTracker, service_error_response


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
        tracker = ResponseStartTracker(send)
        try:
            await asyncio.wait_for(self.app(scope, receive, tracker), self.timeout_s)
        except asyncio.TimeoutError:
            if tracker.started:
                raise
            error = Timeout(f"The request took longer than {self.timeout_s:g} s; try again.")
            await service_error_response(error)(scope, receive, send)
