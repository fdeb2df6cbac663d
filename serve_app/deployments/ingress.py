"""Ingress deployment: HTTP routes, upload validation, and the calls to Embedder and Searcher.

Every upload is decoded and cropped here, at the edge, so bad input never reaches a model and
only 150 KB of pixels per image cross to the Embedder. The request-handling pieces live in their
own modules (client_values, multipart, results, thumbnails, http_app, http_errors, downstream);
this class wires them to the two collaborators it receives through `.bind()`.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
from pathlib import Path

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from image_search.artifact import load_manifest
from image_search.compatibility import check_compatible
from image_search.errors import ClientError, ImageNotFound, IndexedImageUnreadable
from image_search.manifest import ImageRecord, Manifest
from image_search.preprocessing import PreprocessSpec, pixels_from_bytes
from image_search.storage import StoreError, open_store
from serve_app.client_values import parse_image_id, parse_k, parse_thumbnail_size
from serve_app.config import AppArgs
from serve_app.downstream import await_with_progress, downstream, retried
from serve_app.http_app import build_http_app
from serve_app.http_errors import service_error_response
from serve_app.metrics import IngressMetrics
from serve_app.multipart import Upload, read_uploads
from serve_app.results import Query, error_entries, result_entries
from serve_app.thumbnails import LRUBytes, make_thumbnail

logger = logging.getLogger("ray.serve")


def find_ui_dir() -> Path:
    """ui/ beside the package in a checkout; serve_app/ui inside an installed (non-editable) package."""
    checkout = Path(__file__).resolve().parents[2] / "ui"
    return checkout if checkout.is_dir() else Path(__file__).resolve().parents[1] / "ui"


UI_DIR = find_ui_dir()
THUMBNAIL_CACHE_ENTRIES = 1024
SEARCH_ATTEMPTS = 3
# Revalidate every time: the ETag (the content hash) makes that a cheap 304, and a cached copy can
# never outlive what the id means in the index being served.
IMAGE_CACHE_CONTROL = "no-cache"


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
        self.model = await await_with_progress(
            embedder.identity.remote(), args.startup_timeout_s, "the Embedder to load its model and answer"
        )
        check_compatible(
            self.manifest,
            model_name=self.model["model"],
            embedding_dim=self.model["embedding_dim"],
            fingerprint=self.model["fingerprint"],
            preprocessing=self.model["preprocessing"],
        )
        self.spec = PreprocessSpec.from_dict(self.model["preprocessing"])
        self.thumbnails: LRUBytes[tuple[int, int]] = LRUBytes(THUMBNAIL_CACHE_ENTRIES)
        self.metrics = IngressMetrics()

    def __serve_build_asgi_app__(self) -> Starlette:
        routes = [
            Route("/", self.page, methods=["GET"]),
            Route("/search", self.search, methods=["POST"]),
            Route("/images/{image_id}", self.image, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/info", self.info, methods=["GET"]),
        ]
        return build_http_app(routes, self.metrics, self.args.request_timeout_s, UI_DIR)

    # --- routes -------------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        return FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def info(self, request: Request) -> Response:
        return JSONResponse(
            {
                # A name, never a server path (the Embedder names its checkpoint; see checkpoints.py).
                "model": self.model["name"],
                "embedding_dim": self.manifest.embedding_dim,
                "index_size": self.manifest.count,
                "index_version": self.index_version,
                "index_type": self.manifest.index.get("factory"),
                "demo_data": bool(self.model.get("demo", False)),
                "max_k": self.limits.max_k,
                "default_k": self.limits.default_k,
                "max_files": self.limits.max_files,
                "max_file_bytes": self.limits.max_file_bytes,
                "thumbnail_sizes": list(self.args.thumbnail_sizes),
            }
        )

    async def search(self, request: Request) -> Response:
        k = parse_k(request.query_params.get("k"), self.limits.default_k, self.limits.max_k)
        uploads = await read_uploads(
            request.headers.get("content-type"),
            request.headers.get("content-length"),
            request.stream(),
            self.limits,
        )
        prepared = await asyncio.gather(*(asyncio.to_thread(self._prepare, upload) for upload in uploads))
        queries = [
            Query("filename", upload.filename, item if isinstance(item, ClientError) else None)
            for upload, item in zip(uploads, prepared, strict=True)
        ]
        for query in queries:
            self.metrics.count_file(query.error.code if query.error is not None else "ok")
        pixels = [item for item in prepared if isinstance(item, np.ndarray)]
        if not pixels:
            first = next(query.error for query in queries if query.error is not None)
            return service_error_response(first, {"results": error_entries(queries)})
        vectors = await self._embed(pixels)
        scores, ids = await retried(lambda: self.searcher.search.remote(vectors, k), SEARCH_ATTEMPTS, "Searcher")
        root_path = str(request.scope.get("root_path", "")).rstrip("/")
        return JSONResponse({"results": result_entries(queries, scores, ids, self.manifest, root_path)})

    async def _embed(self, pixels: list[np.ndarray]) -> np.ndarray:
        """One Embedder call per image: batching then works across requests as well as within one."""
        vectors = await downstream(asyncio.gather(*(self.embedder.embed.remote(item) for item in pixels)))
        if any(vector is None for vector in vectors):
            raise RuntimeError("the Embedder rejected a crop the Ingress made")
        return np.stack(vectors)

    def _prepare(self, upload: Upload) -> np.ndarray | ClientError:
        if upload.error is not None:
            return upload.error
        try:
            return pixels_from_bytes(bytes(upload.data), self.spec, upload.filename, self.limits.max_pixels)
        except ClientError as exc:
            return exc

    async def image(self, request: Request) -> Response:
        image_id = parse_image_id(request.path_params["image_id"])
        record = self._record(image_id)
        size_param = request.query_params.get("size")
        size = parse_thumbnail_size(size_param, self.args.thumbnail_sizes) if size_param is not None else None
        etag = f'"{record.sha256[:32]}"' if size is None else f'"{record.sha256[:32]}-{size}"'
        headers = {"ETag": etag, "Cache-Control": IMAGE_CACHE_CONTROL}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        if size is None:
            data = await asyncio.to_thread(self._read_image, record)
            media_type = mimetypes.guess_type(record.key)[0] or "application/octet-stream"
            return Response(data, media_type=media_type, headers=headers)
        thumbnail = self.thumbnails.get((image_id, size))
        if thumbnail is None:
            thumbnail = await asyncio.to_thread(self._make_thumbnail, record, size)
            self.thumbnails.put((image_id, size), thumbnail)
        return Response(thumbnail, media_type="image/jpeg", headers=headers)

    def _record(self, image_id: int) -> ImageRecord:
        record = self.manifest.record(image_id)  # a stable id, not a position
        if record is None:
            raise ImageNotFound(f"There is no indexed image with id {image_id}.")
        return record

    def _read_image(self, record: ImageRecord) -> bytes:
        try:
            return self.images.read_bytes(record.key)
        except StoreError as exc:
            # The index lists it but the collection lost it: the server's problem, not the client's.
            logger.error("indexed image %s cannot be read: %s", record.key, exc)
            raise IndexedImageUnreadable("This indexed image cannot be read right now.") from None

    def _make_thumbnail(self, record: ImageRecord, size: int) -> bytes:
        data = self._read_image(record)
        try:
            return make_thumbnail(data, size, self.limits.max_pixels)
        except ClientError as exc:
            # Our own collection holds a file that no longer decodes (or grew past max_pixels).
            logger.error("indexed image %s does not make a thumbnail: %s: %s", record.key, exc.code, exc.message)
            raise IndexedImageUnreadable("This indexed image cannot be shown right now.") from None
