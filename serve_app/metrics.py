"""Prometheus metrics of the deployments, through Ray Serve's metrics API (exported with a `ray_` prefix)."""

from __future__ import annotations

import asyncio
from typing import Protocol

from ray.serve.metrics import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BATCH_SIZE_BUCKETS: list[float] = [1, 2, 4, 8, 16, 32, 64, 128]
LATENCY_MS_BUCKETS: list[float] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]


class EmbedderMetrics:
    def __init__(self) -> None:
        self.batch_size = Histogram(
            "image_search_embed_batch_size",
            description="Images per forward pass of the Embedder.",
            boundaries=BATCH_SIZE_BUCKETS,
        )
        self.batch_latency_ms = Histogram(
            "image_search_embed_batch_latency_ms",
            description="Forward-pass time of one Embedder batch.",
            boundaries=LATENCY_MS_BUCKETS,
        )
        # Text queries run in their own batches (their own queue in the Embedder).
        self.text_batch_size = Histogram(
            "image_search_embed_text_batch_size",
            description="Texts per text forward pass of the Embedder.",
            boundaries=BATCH_SIZE_BUCKETS,
        )
        self.text_batch_latency_ms = Histogram(
            "image_search_embed_text_batch_latency_ms",
            description="Forward-pass time of one Embedder text batch.",
            boundaries=LATENCY_MS_BUCKETS,
        )

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_latency_ms.observe(seconds * 1000)

    def observe_text_batch(self, size: int, seconds: float) -> None:
        self.text_batch_size.observe(size)
        self.text_batch_latency_ms.observe(seconds * 1000)


class SearcherMetrics:
    def __init__(self) -> None:
        self.search_latency_ms = Histogram(
            "image_search_search_latency_ms",
            description="FAISS search time of one Searcher call.",
            boundaries=LATENCY_MS_BUCKETS,
        )

    def observe_search(self, seconds: float) -> None:
        self.search_latency_ms.observe(seconds * 1000)


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "image_search_requests",
            description="Requests answered by the Ingress, by route and status.",
            tag_keys=("route", "status"),  # type: ignore[arg-type]  # Ray annotates tuple[str]
        )
        self.files = Counter(
            "image_search_query_files",
            description="Query files received, by outcome (ok or an error code).",
            tag_keys=("outcome",),
        )
        self.texts = Counter(
            "image_search_query_texts",
            description="Query texts received, by outcome (ok or an error code).",
            tag_keys=("outcome",),
        )

        self.writes = Counter(
            "image_search_writes",
            description="Images written over HTTP, by outcome (added, replaced, unchanged, deleted or an error code).",
            tag_keys=("outcome",),
        )

    def count_write(self, outcome: str) -> None:
        self.writes.inc(tags={"outcome": outcome})

    def count_request(self, route: str, status: int) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})

    def count_file(self, outcome: str) -> None:
        self.files.inc(tags={"outcome": outcome})

    def count_text(self, outcome: str) -> None:
        self.texts.inc(tags={"outcome": outcome})


KNOWN_ROUTES = frozenset({"search", "embed", "images", "info", "healthz", "ui"})


def route_label(path: str) -> str:
    """A bounded label for a path: its first segment if it is one of ours (ids never become labels)."""
    first = path.strip("/").split("/", 1)[0]
    if not first:
        return "page"
    return first if first in KNOWN_ROUTES else "other"


class RequestCounter(Protocol):
    def count_request(self, route: str, status: int) -> None: ...


class RequestCountMiddleware:
    """Counts every answered request by route and status code."""

    def __init__(self, app: ASGIApp, counter: RequestCounter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Counted once the response is on its way (a callback behind this send): recording
                # a Ray metric costs ~0.1 ms, which a response should not wait for.
                status = int(message["status"])
                asyncio.get_running_loop().call_soon(self.counter.count_request, route_label(scope["path"]), status)
            await send(message)

        await self.app(scope, receive, counting_send)
