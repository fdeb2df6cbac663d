"""Ingress deployment: HTTP routes, upload validation, and the calls to Embedder and Searcher.

Every upload is decoded and cropped here, at the edge, so bad input never reaches a model and
only 150 KB of pixels per image cross to the Embedder.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
from collections import OrderedDict
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from image_search.errors import (
    ClientError,
    ImageNotFound,
    InvalidSize,
    Overloaded,
    ServiceError,
    Unavailable,
)
from image_search.manifest import ImageRecord
from image_search.preprocessing import PreprocessSpec, pixels_from_bytes
from image_search.storage import Store, StoreError, open_store
from serve_app import http_errors
from serve_app.config import AppArgs
from serve_app.deadline import DeadlineMiddleware
from serve_app.health import StatusCache, health_report, unknown_report
from serve_app.metrics import IngressMetrics, RequestCountMiddleware
from serve_app.multipart import Upload, read_uploads
from serve_app.results import error_entry, matches_for_row, parse_k
from serve_app.served_index import ServedIndex
from serve_app.thumbnails import make_thumbnail

logger = logging.getLogger("ray.serve")


def find_ui_dir() -> Path:
    """ui/ beside the package in a checkout; serve_app/ui inside an installed (non-editable) package."""
    checkout = Path(__file__).resolve().parents[2] / "ui"
    return checkout if checkout.is_dir() else Path(__file__).resolve().parents[1] / "ui"


UI_DIR = find_ui_dir()
THUMBNAIL_CACHE_ENTRIES = 1024
SEARCH_ATTEMPTS = 3

T = TypeVar("T")
# Ids are stable, but the bytes behind an id may change (an edited photo) and a removed id becomes
# 404: a cache may keep a copy but must revalidate it (a 304 against the content-hash ETag costs
# no body), so no browser or CDN ever shows another picture under an id.
IMAGE_CACHE_CONTROL = "no-cache"


async def downstream(call: Awaitable[T]) -> T:
    """Await a call into another deployment, turning Serve's failures into our 503 errors.

    (Serve installs its own plain-text handlers for these on the ASGI app, so they are mapped
    here, where they are found.)
    """
    try:
        return await call
    except BackPressureError:
        raise Overloaded("The service is busy; try again in a moment.") from None
    except (DeploymentUnavailableError, RayActorError):
        raise Unavailable("A part of the service is restarting; try again in a moment.") from None


class LRUBytes:
    """A small bounded cache of thumbnails (dict order is recency; single event loop, no lock needed)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def get(self, key: tuple[str, int]) -> bytes | None:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: tuple[str, int], value: bytes) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)


@serve.deployment(
    name="Ingress",
    max_ongoing_requests=32,
    ray_actor_options={"num_cpus": 0.25},
    # A replica that cannot load its model or index will not do better on the 20th try.
    max_constructor_retry_count=3,
)
@serve.ingress()
class Ingress:
    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self,
        embedder: DeploymentHandle,
        searcher: DeploymentHandle,
        args: AppArgs,
        index_root: str,
    ) -> None:
        self.embedder = embedder
        self.searcher = searcher
        self.args = args
        self.limits = args.limits
        wait_s = args.startup_wait_s
        logger.info("Ingress waits up to %.0f s for the Embedder to load model %s", wait_s, args.model)
        identity = await self._startup_call(embedder.identity.remote(), "the Embedder to load its model")
        input_spec = await self._startup_call(embedder.input_spec.remote(), "the Embedder's preprocessing")
        self.spec = PreprocessSpec.from_dict(input_spec)
        self.index = ServedIndex(open_store(index_root), identity, input_spec, self._prepare_searcher, args.images)
        logger.info("Ingress waits up to %.0f s for a Searcher to load the published index", wait_s)
        await self._startup_call(self.index.start(), "a Searcher to load the published index")
        self.index.follow(args.reload_interval_s)
        self.status = StatusCache(serve.get_replica_context().app_name, args.health_status_ttl_s)
        self.thumbnails = LRUBytes(THUMBNAIL_CACHE_ENTRIES)
        self.metrics = IngressMetrics()

    async def _startup_call(self, call: Awaitable[T], what: str) -> T:
        try:
            return await asyncio.wait_for(call, self.args.startup_wait_s)
        except asyncio.TimeoutError:
            message = f"the Ingress gave up after {self.args.startup_wait_s:.0f} s waiting for {what} (startup_wait_s)"
            logger.error(message)
            raise RuntimeError(message) from None

    async def _prepare_searcher(self, version: str) -> int:
        count: int = await downstream(self.searcher.prepare.remote(version))
        return count

    async def check_health(self) -> None:
        if not self.index.following_works():
            raise RuntimeError("the Ingress stopped following the published index version")

    def __serve_build_asgi_app__(self) -> Starlette:
        routes: list[BaseRoute] = [
            Route("/", self.page, methods=["GET"]),
            Route("/search", self.search, methods=["POST"]),
            Route("/images/{image_id}", self.image, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/info", self.info, methods=["GET"]),
        ]
        if UI_DIR.is_dir():
            routes.append(Mount("/ui", app=StaticFiles(directory=UI_DIR), name="ui"))
        return Starlette(
            routes=routes,
            middleware=[
                Middleware(RequestCountMiddleware, metrics=self.metrics),
                Middleware(DeadlineMiddleware, timeout_s=self.args.request_timeout_s),
            ],
            exception_handlers={
                ServiceError: http_errors.service_error_response,
                HTTPException: self._http_exception,
                Exception: http_errors.internal_error_response,
            },
        )

    @staticmethod
    async def _http_exception(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        return JSONResponse(http_errors.error_body(code, str(getattr(exc, "detail", ""))), status_code=status)

    # --- routes -------------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        return FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def healthz(self, request: Request) -> Response:
        serving = self.index.describe()
        try:
            deployments = await self.status.deployments()
        except Exception as exc:  # Serve's controller unreachable: say so instead of guessing
            logger.warning("healthz cannot read Serve's status: %s", str(exc).splitlines()[0][:300])
            status, body = unknown_report("cannot read Serve's status", serving)
        else:
            status, body = health_report(deployments, serving)
        return JSONResponse(body, status_code=status)

    async def info(self, request: Request) -> Response:
        manifest = self.index.current.manifest
        return JSONResponse(
            {
                "model": manifest.model,
                "embedding_dim": manifest.embedding_dim,
                **self.index.describe(),
                "reload_interval_s": self.args.reload_interval_s,
                "index_type": manifest.index.get("factory"),
                "max_k": self.limits.max_k,
                "default_k": self.limits.default_k,
                "max_files": self.limits.max_files,
                "max_file_bytes": self.limits.max_file_bytes,
                "thumbnail_sizes": list(self.args.thumbnail_sizes),
            }
        )

    async def search(self, request: Request) -> Response:
        k = parse_k(request.query_params.get("k"), self.limits)
        uploads = await read_uploads(
            request.headers.get("content-type"),
            request.headers.get("content-length"),
            request.stream(),
            self.limits,
        )
        prepared = await asyncio.gather(*(asyncio.to_thread(self._prepare, upload) for upload in uploads))
        errors = [item for item in prepared if isinstance(item, ClientError)]
        for item in prepared:
            self.metrics.count_file(item.code if isinstance(item, ClientError) else "ok")
        if len(errors) == len(prepared):
            raise errors[0]
        pixels = [item for item in prepared if isinstance(item, np.ndarray)]
        # One Embedder call per image: batching then works across requests as well as within one.
        vectors = await downstream(asyncio.gather(*(self.embedder.embed.remote(item) for item in pixels)))
        if any(vector is None for vector in vectors):
            raise RuntimeError("the Embedder rejected a crop the Ingress made")
        # One version for the whole answer: the Searcher searches it, its manifest names the records.
        with self.index.lease() as version:
            scores, ids = await self._search(np.stack(vectors), k, version.name)
            results: list[dict[str, Any]] = []
            root_path = str(request.scope.get("root_path", "")).rstrip("/")
            row = 0
            for upload, item in zip(uploads, prepared, strict=True):
                if isinstance(item, ClientError):
                    results.append(error_entry(upload.filename, item))
                else:
                    results.append(
                        {
                            "filename": upload.filename,
                            "matches": matches_for_row(scores[row], ids[row], version.manifest, root_path),
                        }
                    )
                    row += 1
        return JSONResponse({"index_version": version.name, "results": results})

    async def _search(self, vectors: np.ndarray, k: int, version: str) -> tuple[np.ndarray, np.ndarray]:
        """Searches are read-only, so a call lost with a dying replica is simply sent again."""
        for attempt in range(SEARCH_ATTEMPTS):
            try:
                result: tuple[np.ndarray, np.ndarray] = await downstream(
                    self.searcher.search.remote(vectors, k, version)
                )
                return result
            except Unavailable:
                if attempt == SEARCH_ATTEMPTS - 1:
                    raise
                logger.warning("a Searcher replica died during a search; retrying on another")
        raise AssertionError("unreachable")

    def _prepare(self, upload: Upload) -> np.ndarray | ClientError:
        try:
            return pixels_from_bytes(bytes(upload.data), self.spec, upload.filename, self.limits.max_pixels)
        except ClientError as exc:
            return exc

    async def image(self, request: Request) -> Response:
        with self.index.lease() as version:
            record = self._record(request.path_params["image_id"], version.manifest)
            images = self.index.images(version)
        etag = f'"{record.sha256[:32]}"'
        size_param = request.query_params.get("size")
        size = self._thumbnail_size(size_param) if size_param is not None else None
        if size is not None:
            etag = f'"{record.sha256[:32]}-{size}"'
        headers = {"ETag": etag, "Cache-Control": IMAGE_CACHE_CONTROL}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        if size is None:
            data = await asyncio.to_thread(self._read_image, images, record.key)
            media_type = mimetypes.guess_type(record.key)[0] or "application/octet-stream"
            return Response(data, media_type=media_type, headers=headers)
        # Keyed by content, not id: the bytes behind an id can change from one version to the next.
        thumbnail = self.thumbnails.get((record.sha256, size))
        if thumbnail is None:
            data = await asyncio.to_thread(self._read_image, images, record.key)
            thumbnail = await asyncio.to_thread(make_thumbnail, data, size, self.limits.max_pixels)
            self.thumbnails.put((record.sha256, size), thumbnail)
        return Response(thumbnail, media_type="image/jpeg", headers=headers)

    @staticmethod
    def _record(raw: str, manifest: Any) -> ImageRecord:
        record = manifest.record(int(raw)) if raw.isascii() and raw.isdigit() and len(raw) <= 12 else None
        if record is None:
            raise ImageNotFound(f"There is no indexed image with id {raw[:40]!r}.")
        return record

    def _thumbnail_size(self, raw: str) -> int:
        sizes = self.args.thumbnail_sizes
        if not raw.isdigit() or int(raw) not in sizes:
            raise InvalidSize(f"size must be one of {', '.join(map(str, sizes))}.")
        return int(raw)

    @staticmethod
    def _read_image(images: Store, key: str) -> bytes:
        try:
            return images.read_bytes(key)
        except StoreError as exc:
            # The index lists it but the collection lost it: the server's problem, not the client's.
            logger.error("indexed image missing: %s", exc)
            raise
