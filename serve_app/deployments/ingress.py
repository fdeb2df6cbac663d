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

from image_search.artifact import load_manifest
from image_search.compatibility import check_compatible
from image_search.errors import (
    ClientError,
    ImageNotFound,
    InvalidSize,
    Overloaded,
    ServiceError,
    Unavailable,
)
from image_search.manifest import Manifest
from image_search.preprocessing import PreprocessSpec, pixels_from_bytes
from image_search.storage import StoreError, open_store
from serve_app import http_errors
from serve_app.config import AppArgs
from serve_app.deadline import DeadlineMiddleware
from serve_app.metrics import IngressMetrics, RequestCountMiddleware
from serve_app.multipart import Upload, read_uploads
from serve_app.results import error_entry, matches_for_row, parse_k
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
IMAGE_CACHE_CONTROL = "public, max-age=3600"


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
        self.items: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def get(self, key: tuple[int, int]) -> bytes | None:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: tuple[int, int], value: bytes) -> None:
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
        version_folder: str,
    ) -> None:
        self.embedder = embedder
        self.searcher = searcher
        self.args = args
        self.limits = args.limits
        self.manifest: Manifest = load_manifest(open_store(index_root), version_folder)
        self.index_version = version_folder.rsplit("/", 1)[-1] or "unversioned"
        self.images = open_store(self.manifest.source)
        identity = await embedder.identity.remote()
        input_spec = await embedder.input_spec.remote()
        check_compatible(
            self.manifest,
            model_name=identity["model"],
            embedding_dim=identity["embedding_dim"],
            fingerprint=identity["fingerprint"],
            preprocessing=input_spec,
        )
        self.spec = PreprocessSpec.from_dict(input_spec)
        self.thumbnails = LRUBytes(THUMBNAIL_CACHE_ENTRIES)
        self.metrics = IngressMetrics()

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
        return JSONResponse({"status": "ok"})

    async def info(self, request: Request) -> Response:
        return JSONResponse(
            {
                "model": self.manifest.model,
                "embedding_dim": self.manifest.embedding_dim,
                "index_size": self.manifest.count,
                "index_version": self.index_version,
                "index_type": self.manifest.index.get("factory"),
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
        scores, ids = await self._search(np.stack(vectors), k)
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
                        "matches": matches_for_row(scores[row], ids[row], self.manifest, root_path),
                    }
                )
                row += 1
        return JSONResponse({"results": results})

    async def _search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Searches are read-only, so a call lost with a dying replica is simply sent again."""
        for attempt in range(SEARCH_ATTEMPTS):
            try:
                result: tuple[np.ndarray, np.ndarray] = await downstream(self.searcher.search.remote(vectors, k))
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
        record_id = self._record_id(request.path_params["image_id"])
        record = self.manifest.record(record_id)
        if record is None:
            raise ImageNotFound(f"There is no indexed image with id {record_id}.")
        etag = f'"{record.sha256[:32]}"'
        size_param = request.query_params.get("size")
        size = self._thumbnail_size(size_param) if size_param is not None else None
        if size is not None:
            etag = f'"{record.sha256[:32]}-{size}"'
        headers = {"ETag": etag, "Cache-Control": IMAGE_CACHE_CONTROL}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        if size is None:
            data = await asyncio.to_thread(self._read_image, record.key)
            media_type = mimetypes.guess_type(record.key)[0] or "application/octet-stream"
            return Response(data, media_type=media_type, headers=headers)
        thumbnail = self.thumbnails.get((record_id, size))
        if thumbnail is None:
            data = await asyncio.to_thread(self._read_image, record.key)
            thumbnail = await asyncio.to_thread(make_thumbnail, data, size, self.limits.max_pixels)
            self.thumbnails.put((record_id, size), thumbnail)
        return Response(thumbnail, media_type="image/jpeg", headers=headers)

    def _record_id(self, raw: str) -> int:
        if not raw.isdigit() or len(raw) > 12:
            raise ImageNotFound(f"There is no indexed image with id {raw[:40]!r}.")
        return int(raw)

    def _thumbnail_size(self, raw: str) -> int:
        sizes = self.args.thumbnail_sizes
        if not raw.isdigit() or int(raw) not in sizes:
            raise InvalidSize(f"size must be one of {', '.join(map(str, sizes))}.")
        return int(raw)

    def _read_image(self, path: str) -> bytes:
        try:
            return self.images.read_bytes(path)
        except StoreError as exc:
            # The index lists it but the collection lost it: the server's problem, not the client's.
            logger.error("indexed image missing: %s", exc)
            raise
