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
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from image_search.artifact import load_manifest
from image_search.compatibility import check_compatible
from image_search.errors import ClientError, ImageNotFound, IndexedImageUnreadable, TextSearchUnavailable
from image_search.manifest import ImageRecord, Manifest
from image_search.preprocessing import PreprocessSpec, pixels_from_bytes
from image_search.storage import StoreError, open_store
from serve_app.client_values import parse_image_id, parse_k, parse_thumbnail_size
from serve_app.combined import FILE_WEIGHT_FIELD, TEXT_WEIGHT_FIELD, combined_part, parse_weights, weighted_sum
from serve_app.config import AppArgs
from serve_app.downstream import await_with_progress, downstream, retried
from serve_app.forms import SearchForm, read_search_form
from serve_app.http_app import build_http_app
from serve_app.http_errors import service_error_response
from serve_app.metrics import IngressMetrics
from serve_app.multipart import Upload
from serve_app.results import Query, error_entries, matches_for_row, result_entries
from serve_app.text_queries import TextQuery, check_counts, single_query_param
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


def text_result(query: TextQuery, answer: dict[str, Any]) -> Query:
    """A text's entry: named by "text", with "truncated": true when the model read only its start."""
    return Query("text", query.text, None, {"truncated": True} if answer["truncated"] else {})


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
        self.text_search = bool((await embedder.text_search.remote())["available"])
        self.thumbnails: LRUBytes[tuple[int, int]] = LRUBytes(THUMBNAIL_CACHE_ENTRIES)
        self.metrics = IngressMetrics()

    def __serve_build_asgi_app__(self) -> Starlette:
        routes = [
            Route("/", self.page, methods=["GET"]),
            Route("/search", self.search, methods=["POST"]),
            Route("/search", self.search_text, methods=["GET"]),
            Route("/search/combined", self.search_combined, methods=["POST"]),
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
                "precision": self.model["precision"],  # what the Embedder runs, "auto" resolved
                "index_size": self.manifest.count,
                "index_version": self.index_version,
                "index_type": self.manifest.index.get("factory"),
                "demo_data": bool(self.model.get("demo", False)),
                "max_k": self.limits.max_k,
                "default_k": self.limits.default_k,
                "max_files": self.limits.max_files,
                "max_file_bytes": self.limits.max_file_bytes,
                "text_search": self.text_search,
                "max_text_chars": self.limits.max_text_chars,
                "max_texts": self.limits.max_texts,
                "max_queries": self.limits.max_queries,
                "thumbnail_sizes": list(self.args.thumbnail_sizes),
            }
        )

    async def search(self, request: Request) -> Response:
        """Photos and texts: one entry per file, then per text, in request order."""
        k = parse_k(request.query_params.get("k"), self.limits.default_k, self.limits.max_k)
        form = await self._read_form(request)
        prepared = await self._prepare_all(form.uploads)
        texts = [self._checked_text(query) for query in form.texts]
        file_queries = [
            Query("filename", upload.filename, item if isinstance(item, ClientError) else None)
            for upload, item in zip(form.uploads, prepared, strict=True)
        ]
        pixels = [item for item in prepared if isinstance(item, np.ndarray)]
        usable = [query.text for query in texts if query.error is None]
        if not pixels and not usable:
            queries = [*file_queries, *(Query("text", query.text, query.error) for query in texts)]
            first = next(query.error for query in queries if query.error is not None)
            return service_error_response(first, {"results": error_entries(queries)})
        image_vectors, text_answers = await asyncio.gather(self._embed(pixels), self._embed_texts(usable))
        answers = iter(text_answers)
        text_queries = [
            Query("text", query.text, query.error) if query.error is not None else text_result(query, next(answers))
            for query in texts
        ]
        vectors = np.concatenate([image_vectors, self._stack([answer["vector"] for answer in text_answers])])
        scores, ids = await retried(lambda: self.searcher.search.remote(vectors, k), SEARCH_ATTEMPTS, "Searcher")
        root_path = str(request.scope.get("root_path", "")).rstrip("/")
        entries = result_entries([*file_queries, *text_queries], scores, ids, self.manifest, root_path)
        return JSONResponse({"results": entries})

    async def search_text(self, request: Request) -> Response:
        """GET /search?q=...&k=...: one text query, for links and scripts."""
        k = parse_k(request.query_params.get("k"), self.limits.default_k, self.limits.max_k)
        query = self._checked_text(TextQuery(single_query_param(request.scope.get("query_string", b""), self.limits)))
        if query.error is not None:
            raise query.error
        (answer,) = await self._embed_texts([query.text])
        vectors = answer["vector"][None, :]
        scores, ids = await retried(lambda: self.searcher.search.remote(vectors, k), SEARCH_ATTEMPTS, "Searcher")
        root_path = str(request.scope.get("root_path", "")).rstrip("/")
        return JSONResponse(
            {"results": result_entries([text_result(query, answer)], scores, ids, self.manifest, root_path)}
        )

    async def search_combined(self, request: Request) -> Response:
        """Photos and texts with weights -> one result list for the normalised weighted sum."""
        k = parse_k(request.query_params.get("k"), self.limits.default_k, self.limits.max_k)
        form = await self._read_form(request)
        file_weights = parse_weights(form.file_weights, len(form.uploads), FILE_WEIGHT_FIELD, "file")
        text_weights = parse_weights(form.text_weights, len(form.texts), TEXT_WEIGHT_FIELD, "text")
        # One answer for all queries: any query that cannot be used fails the request.
        texts = [self._checked_text(query) for query in form.texts]
        for query in texts:
            if query.error is not None:
                raise query.error
        prepared = await self._prepare_all(form.uploads)
        for item in prepared:
            if isinstance(item, ClientError):
                raise item
        pixels = [item for item in prepared if isinstance(item, np.ndarray)]
        image_vectors, text_answers = await asyncio.gather(
            self._embed(pixels), self._embed_texts([query.text for query in texts])
        )
        vectors = np.concatenate([image_vectors, self._stack([answer["vector"] for answer in text_answers])])
        combined = weighted_sum(vectors, [*file_weights, *text_weights])[None, :]
        scores, ids = await retried(lambda: self.searcher.search.remote(combined, k), SEARCH_ATTEMPTS, "Searcher")
        root_path = str(request.scope.get("root_path", "")).rstrip("/")
        parts = [
            *(
                combined_part("filename", upload.filename, w)
                for upload, w in zip(form.uploads, file_weights, strict=True)
            ),
            *(
                combined_part("text", query.text, w, bool(answer["truncated"]))
                for query, w, answer in zip(texts, text_weights, text_answers, strict=True)
            ),
        ]
        matches = matches_for_row(scores[0], ids[0], self.manifest, root_path)
        return JSONResponse({"results": [{"combined": parts, "matches": matches}]})

    async def _read_form(self, request: Request) -> SearchForm:
        form = await read_search_form(
            request.headers.get("content-type"),
            request.headers.get("content-length"),
            request.stream(),
            self.limits,
        )
        check_counts(len(form.uploads), len(form.texts), self.limits)
        return form

    async def _prepare_all(self, uploads: list[Upload]) -> list[np.ndarray | ClientError]:
        prepared = await asyncio.gather(*(asyncio.to_thread(self._prepare, upload) for upload in uploads))
        for item in prepared:
            self.metrics.count_file(item.code if isinstance(item, ClientError) else "ok")
        return list(prepared)

    def _stack(self, vectors: list[np.ndarray]) -> np.ndarray:
        """(n, dim) float32, also for n = 0 (a request with photos only, or texts only)."""
        if not vectors:
            return np.empty((0, self.manifest.embedding_dim), dtype=np.float32)
        return np.stack(vectors).astype(np.float32, copy=False)

    async def _embed(self, pixels: list[np.ndarray]) -> np.ndarray:
        """One Embedder call per image: batching then works across requests as well as within one."""
        vectors = await downstream(asyncio.gather(*(self.embedder.embed.remote(item) for item in pixels)))
        if any(vector is None for vector in vectors):
            raise RuntimeError("the Embedder rejected a crop the Ingress made")
        return self._stack(list(vectors))

    def _checked_text(self, query: TextQuery) -> TextQuery:
        """A usable text stays as it is; with a model that has no text tower, none is usable. Counted."""
        if query.error is None and not self.text_search:
            query = TextQuery(query.text, TextSearchUnavailable("Search by text is not available with this model."))
        self.metrics.count_text(query.error.code if query.error is not None else "ok")
        return query

    async def _embed_texts(self, texts: list[str]) -> list[dict[str, Any]]:
        """One Embedder call per text (batched there with other requests' texts, apart from images)."""
        return list(await downstream(asyncio.gather(*(self.embedder.embed_text.remote(text) for text in texts))))

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
