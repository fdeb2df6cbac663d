"""The Ingress's Starlette application: routes plus the middleware every request passes through.

Outermost first: the request counter (sees every status, 500s included), the catch-all that turns
an unexpected exception into a JSON 500, then our end-to-end deadline. Errors become HTTP in
`serve_app.http_errors` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from serve_app.deadline import DeadlineMiddleware
from serve_app.http_errors import EXCEPTION_HANDLERS, InternalErrorMiddleware
from serve_app.metrics import RequestCounter, RequestCountMiddleware


def build_http_app(
    routes: Sequence[BaseRoute], counter: RequestCounter, request_timeout_s: float, ui_dir: Path | None = None
) -> Starlette:
    all_routes = list(routes)
    if ui_dir is not None and ui_dir.is_dir():
        all_routes.append(Mount("/ui", app=StaticFiles(directory=ui_dir), name="ui"))
    return Starlette(
        routes=all_routes,
        middleware=[
            Middleware(RequestCountMiddleware, counter=counter),
            Middleware(InternalErrorMiddleware),
            Middleware(DeadlineMiddleware, timeout_s=request_timeout_s),
        ],
        exception_handlers=dict(EXCEPTION_HANDLERS),
    )
