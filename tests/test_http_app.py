"""The Ingress's middleware stack without Ray: every status is counted, errors become JSON in one place."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from image_search.errors import IndexedImageUnreadable, InvalidK
from serve_app.http_app import build_http_app


class Counts:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def count_request(self, route: str, status: int) -> None:
        self.seen.append((route, status))


async def ok(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def crash(request: Request) -> Response:
    raise RuntimeError("a bug on our side")


async def client_mistake(request: Request) -> Response:
    raise InvalidK("k must be from 1 to 100; got 0.")


async def our_data_fault(request: Request) -> Response:
    raise IndexedImageUnreadable("This indexed image cannot be read right now.")


async def slow(request: Request) -> Response:
    await asyncio.Event().wait()  # never set: only the deadline ends this request
    return Response()


async def read_body(request: Request) -> Response:
    return JSONResponse({"bytes": len(await request.body())})


ROUTES = [
    Route("/info", ok),
    Route("/upload", read_body, methods=["POST"]),
    Route("/search", crash, methods=["POST"]),
    Route("/healthz", client_mistake),
    Route("/images/{image_id}", our_data_fault),
    Route("/page", slow),
]


def call(
    path: str,
    method: str = "GET",
    timeout_s: float = 5.0,
    disconnect_after: int | None = None,
    receive_error: Exception | None = None,
) -> tuple[int, dict[str, str], Any, Counts]:
    """One request through the real Starlette stack, driven as an ASGI server would."""
    counts = Counts()
    app = build_http_app(ROUTES, counts, request_timeout_s=timeout_s)
    messages: list[dict[str, Any]] = []

    received = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        if disconnect_after is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        received += 1
        if received > disconnect_after:  # the client went away mid-body
            if receive_error is not None:
                raise receive_error  # how Serve's replica reports it: the read from its proxy fails
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [], "root_path": "", "scheme": "http", "server": ("127.0.0.1", 80)}  # fmt: skip
    asyncio.run(app(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, json.loads(body) if body else None, counts


def test_an_unexpected_exception_is_a_json_500_and_is_counted() -> None:
    status, _, body, counts = call("/search", "POST")
    assert status == 500
    assert body["error"]["code"] == "internal"
    assert "bug" not in body["error"]["message"]  # no internals leak to the client
    assert counts.seen == [("search", 500)]


def test_a_client_error_keeps_its_status_and_code_and_is_counted() -> None:
    status, _, body, counts = call("/healthz")
    assert (status, body["error"]["code"]) == (422, "invalid_k")
    assert counts.seen == [("healthz", 422)]


def test_a_fault_in_our_data_is_a_5xx() -> None:
    status, _, body, counts = call("/images/3")
    assert (status, body["error"]["code"]) == (500, "indexed_image_unreadable")
    assert counts.seen == [("images", 500)]


def test_unknown_routes_and_methods_are_json_and_counted() -> None:
    assert call("/nowhere")[0:3:2] == (404, {"error": {"code": "not_found", "message": "Not Found", "filename": None}})
    status, _, body, counts = call("/info", "DELETE")
    assert (status, body["error"]["code"], counts.seen) == (405, "method_not_allowed", [("info", 405)])


def test_the_deadline_answers_503_with_retry_after_and_is_counted() -> None:
    status, headers, body, counts = call("/page", timeout_s=0.05)
    assert (status, body["error"]["code"], headers["retry-after"]) == (503, "timeout", "1")
    assert counts.seen == [("other", 503)]


def test_a_normal_answer_is_counted_once() -> None:
    assert call("/info")[0] == 200
    assert call("/info")[3].seen == [("info", 200)]


class TaskCancelledError(Exception):
    """Stands for ray.exceptions.TaskCancelledError, what Serve's receive raises when the client left."""


@pytest.mark.parametrize("receive_error", [None, TaskCancelledError("Task: 8cf5 was cancelled.")])
def test_a_client_that_leaves_mid_upload_is_not_our_error(
    caplog: pytest.LogCaptureFixture, receive_error: Exception | None
) -> None:
    """Counted as 499 client_closed, logged in one line without a traceback, never a 500."""
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        status, _, body, counts = call("/upload", "POST", disconnect_after=3, receive_error=receive_error)
    assert (status, body["error"]["code"]) == (499, "client_closed")
    assert counts.seen == [("other", 499)]
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]
    assert any("client closed" in record.getMessage() for record in caplog.records)
