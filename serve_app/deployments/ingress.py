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
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute

from image_search.decoding import decoded_pixels
from image_search.errors import (
    ClientError,
    ImageNotFound,
    IndexedImageUnreadable,
    TextSearchUnavailable,
    TooManyRequestPixels,
)
from image_search.manifest import ImageRecord
from image_search.preprocessing import PreprocessSpec, pixels_from_bytes
from image_search.storage import Store, open_store
from serve_app.api_docs import API_DESCRIPTION, DOCS_PAGE, SERVICE_VERSION, swagger_assets
from serve_app.api_table import endpoints, starlette_routes
from serve_app.body import read_body
from serve_app.client_values import parse_image_id, parse_k, parse_thumbnail_size
from serve_app.combined import FILE_WEIGHT_FIELD, TEXT_WEIGHT_FIELD, combined_part, parse_weights, weighted_sum
from serve_app.config import AppArgs
from serve_app.downstream import await_with_progress, downstream
from serve_app.forms import SearchForm, read_search_form
from serve_app.health import ServeMessageLog, StatusCache, health_report, unknown_report
from serve_app.http_app import build_http_app
from serve_app.http_errors import service_error_response
from serve_app.image_files import original_chunks, read_verified
from serve_app.metrics import IngressMetrics
from serve_app.multipart import Upload
from serve_app.openapi import openapi_document
from serve_app.queries.duplicate_groups import group_pairs
from serve_app.queries.duplicates import describe_page, parse_duplicates_query
from serve_app.queries.filters import (
    FilterCache,
    SearchFilters,
    attach_duplicates,
    below_min_score,
    folders,
    parse_filters,
)
from serve_app.queries.vectors import parse_vector_body, vector_body_limit
from serve_app.recall_info import recall_report
from serve_app.results import Query, error_entries, matches_for_row, result_entries
from serve_app.served_index import ServedIndex, Version
from serve_app.sharded_searcher import ShardedSearcher, ShardUnavailable, partial_fields
from serve_app.stage_times import Snapshot, StageTimes
from serve_app.text_queries import TextQuery, check_counts, single_query_param
from serve_app.thumbnails import LRUBytes, ThumbnailDiskCache, cached_thumbnail, default_thumbnail_dir, make_thumbnail
from serve_app.version_records import RecordLookup
from serve_app.writes.auth import ReadTokenMiddleware
from serve_app.writes.routes import ImageWrites, load_tokens, parse_wait, read_upload_form

logger = logging.getLogger("ray.serve")


def find_ui_dir() -> Path:
    """ui/ beside the package in a checkout; serve_app/ui inside an installed (non-editable) package."""
    checkout = Path(__file__).resolve().parents[2] / "ui"
    return checkout if checkout.is_dir() else Path(__file__).resolve().parents[1] / "ui"


UI_DIR = find_ui_dir()
THUMBNAIL_CACHE_ENTRIES = 1024
# Revalidate every time: the ETag (the content hash) makes that a cheap 304, and a cached copy can
# never outlive what the id means in the index being served (ids are stable, but an edited photo
# keeps its id with new bytes, and a removed one becomes 404).
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
        searchers: list[DeploymentHandle],
        args: AppArgs,
        index_root: str,
        writer: DeploymentHandle | None = None,
    ) -> None:
        # Calls go over Serve's inter-deployment gRPC rather than Ray actor calls: ~1 ms less of this
        # replica's CPU per request (benchmarks/README.md, "Where the serving CPU goes"). A dead
        # replica still surfaces as RayActorError (ActorUnavailableError), which `downstream` maps.
        # Messages are capped at 4 MiB (RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH): ours are one
        # crop (~150 KB) or one search of at most max_queries vectors (bounded for this in config.py).
        self.embedder = embedder.options(_by_reference=False)
        self.args = args
        self.limits = args.limits
        self.model = await await_with_progress(
            self.embedder.identity.remote(), args.startup_timeout_s, "the Embedder to load its model and answer"
        )
        # Every Searcher call goes through here: one deployment, or each shard's answers merged.
        self.searcher = ShardedSearcher(searchers, args.searcher, int(self.model["embedding_dim"]))
        self.spec = PreprocessSpec.from_dict(self.model["preprocessing"])
        # A random demo model: every search answer says so, or a curl user sees scores that mean nothing.
        self.demo = bool(self.model.get("demo", False))
        self.text_search = bool((await self.embedder.text_search.remote())["available"])
        # Replicas start on what is published now (CURRENT), never on a version fixed at deploy time.
        self.index = ServedIndex(open_store(index_root), self.model, self._prepare_searcher, args.images)
        await await_with_progress(
            self.index.start(), args.startup_timeout_s, "a Searcher to load the published index version"
        )
        self.index.follow(args.reload_interval_s)
        self.status = StatusCache(serve.get_replica_context().app_name, args.health_status_ttl_s)
        self.serve_messages = ServeMessageLog()
        # Keyed by content hash, not id: the bytes behind an id can change from one version to the next.
        self.thumbnails: LRUBytes[tuple[str, int]] = LRUBytes(THUMBNAIL_CACHE_ENTRIES)
        self.thumbnail_disk = ThumbnailDiskCache(
            Path(args.thumbnail_cache_dir) if args.thumbnail_cache_dir else default_thumbnail_dir(),
            args.thumbnail_cache_max_bytes,
        )
        self.metrics = IngressMetrics()
        # Where a POST /search's time goes in this replica (benchmarks/served.py reads it).
        self.stages = StageTimes()
        self.decode_slots = asyncio.Semaphore(self.limits.max_concurrent_decodes)
        # Writes (POST /images, DELETE /images/{id}): the token read here, in the replica's own process.
        self.tokens = load_tokens(args.writes)
        self.writes = ImageWrites(writer, self.tokens, self.index, self.limits, self.metrics)
        self.filters = FilterCache()
        self.folder_counts: dict[str, tuple[list[dict[str, object]], int]] = {}
        self.duplicate_groups: dict[tuple[str, float], tuple[list[list[int]], bool]] = {}

    async def _prepare_searcher(self, version: str) -> int:
        return await self.searcher.prepare(version)

    async def _search_filtered(
        self, vectors: np.ndarray, k: int, version: Version, filters: SearchFilters, exclude: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[dict[int, list[int]]] | None, tuple[int, ...]]:
        """Search the version the request holds (the Searchers load it if they lack it) with the request's
        filters (serve_app/queries/filters.py): prefixes inside the scan, `exclude` (similar-to's own image)
        never returned, min_score applied, dedup collapsed. Last: the shards that did not answer
        (only with searcher.allow_partial; `partial_fields` says so in the answer)."""
        id_filter = None
        if filters.restricts or exclude is not None:
            id_filter = await self.filters.get(version.manifest, filters.prefixes)
            if exclude is not None:
                id_filter = id_filter.without(exclude)
        duplicates: list[dict[int, list[int]]] | None = None
        live = version.manifest.count
        if filters.dedup:
            found = await self.searcher.search_dedup(
                vectors, k, version.name, live, id_filter, self.limits.dedup_cosine
            )
            rows, missing = found.value, found.missing
            scores = np.full((len(rows), k), -np.inf, dtype=np.float32)
            ids = np.full((len(rows), k), -1, dtype=np.int64)
            for i, row in enumerate(rows):
                scores[i, : len(row.ids)] = row.scores
                ids[i, : len(row.ids)] = row.ids
            duplicates = [
                {int(image_id): dups for image_id, dups in zip(row.ids.tolist(), row.duplicates, strict=True)}
                for row in rows
            ]
        else:
            answer = await self.searcher.search(vectors, k, version.name, live, id_filter)
            (scores, ids), missing = answer.value, answer.missing
        return scores, below_min_score(scores, ids, filters.min_score), duplicates, missing

    async def stage_times(self) -> Snapshot:
        """Seconds summed per stage of POST /search so far (serve_app/stage_times.py)."""
        return self.stages.snapshot()

    async def check_health(self) -> None:
        if not self.index.following_works():
            raise RuntimeError("the Ingress stopped following the published index version")

    def __serve_build_asgi_app__(self) -> Starlette:
        # Routes and /openapi.json come from one table (serve_app/api_table.py): they cannot drift.
        self.api = endpoints(self.args, int(self.model["embedding_dim"]))
        self.schema = openapi_document(self.api, "Image search", SERVICE_VERSION, API_DESCRIPTION)
        routes: list[BaseRoute] = [*starlette_routes(self.api, self), swagger_assets()]
        app = build_http_app(routes, self.metrics, self.args.request_timeout_s, UI_DIR)
        app.add_middleware(ReadTokenMiddleware, tokens=self.tokens)  # passes everything when no read token is set
        return app

    # --- routes -------------------------------------------------------------------------------

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(self.schema)

    async def docs(self, request: Request) -> Response:
        return HTMLResponse(DOCS_PAGE, headers={"Cache-Control": "no-cache"})

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
            status, body = health_report(deployments, serving, self.serve_messages)
        return JSONResponse(body, status_code=status)

    async def info(self, request: Request) -> Response:
        manifest = self.index.current.manifest
        return JSONResponse(
            {
                # A name, never a server path (the Embedder names its checkpoint; see checkpoints.py).
                "model": self.model["name"],
                "embedding_dim": manifest.embedding_dim,
                "precision": self.model["precision"],  # what the Embedder runs, "auto" resolved
                **self.index.describe(),
                "reload_interval_s": self.args.reload_interval_s,
                "index_type": manifest.index.get("factory"),
                # Measured when each segment was written (tuned to the target), from the version file.
                "recall": recall_report(manifest.version, self.args.searcher.nprobe, self.args.searcher.ef_search),
                "shards": self.searcher.shards,
                "demo_data": self.demo,
                "max_k": self.limits.max_k,
                "default_k": self.limits.default_k,
                "max_files": self.limits.max_files,
                "max_file_bytes": self.limits.max_file_bytes,
                "text_search": self.text_search,
                "max_text_chars": self.limits.max_text_chars,
                "max_texts": self.limits.max_texts,
                "max_queries": self.limits.max_queries,
                "thumbnail_sizes": list(self.args.thumbnail_sizes),
                "writes": self.writes.enabled,
                "reads_need_token": self.tokens.reads_need_token,
            }
        )

    async def search(self, request: Request) -> Response:
        """Photos and texts: one entry per file, then per text, in request order."""
        lap = self.stages.laps()
        k = parse_k(request.query_params.get("k"), self.limits.default_k, self.limits.max_k)
        filters = parse_filters(request.query_params)
        form = await self._read_form(request)
        lap("read form")
        prepared = await self._prepare_all(form.uploads)
        lap("decode + crop")
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
        lap("Embedder calls")
        answers = iter(text_answers)
        text_queries = [
            Query("text", query.text, query.error) if query.error is not None else text_result(query, next(answers))
            for query in texts
        ]
        vectors = np.concatenate([image_vectors, self._stack([answer["vector"] for answer in text_answers])])
        root_path = str(request.scope.get("root_path", "")).rstrip("/")
        # One version for the whole answer: the Searcher searches the version this request holds,
        # and that version's manifest turns the ids into records, whatever switches meanwhile.
        with self.index.lease() as version:
            lap("vectors stacked")
            scores, ids, duplicates, missing = await self._search_filtered(vectors, k, version, filters)
            lap("Searcher call")
            entries = result_entries([*file_queries, *text_queries], scores, ids, version.manifest, root_path)
            attach_duplicates(entries, duplicates)
        response = JSONResponse(
            {"index_version": version.name, "demo": self.demo, "results": entries, **partial_fields(missing)}
        )
        lap("results + JSON")
        lap.total("handler")
        return response

    async def search_text(self, request: Request) -> Response:
        """GET /search?q=...&k=...: one text query, for links and scripts."""
        k = parse_k(request.query_params.get("k"), self.limits.default_k, self.limits.max_k)
        filters = parse_filters(request.query_params)
        query = self._checked_text(TextQuery(single_query_param(request.scope.get("query_string", b""), self.limits)))
        if query.error is not None:
            raise query.error
        (answer,) = await self._embed_texts([query.text])
        vectors = answer["vector"][None, :]
        root_path = str(request.scope.get("root_path", "")).rstrip("/")
        with self.index.lease() as version:
            scores, ids, duplicates, missing = await self._search_filtered(vectors, k, version, filters)
            entries = result_entries([text_result(query, answer)], scores, ids, version.manifest, root_path)
            attach_duplicates(entries, duplicates)
        return JSONResponse(
            {"index_version": version.name, "demo": self.demo, "results": entries, **partial_fields(missing)}
        )

    async def search_combined(self, request: Request) -> Response:
        """Photos and texts with weights -> one result list for the normalised weighted sum."""
        k = parse_k(request.query_params.get("k"), self.limits.default_k, self.limits.max_k)
        filters = parse_filters(request.query_params)
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
        root_path = str(request.scope.get("root_path", "")).rstrip("/")
        with self.index.lease() as version:
            scores, ids, duplicates, missing = await self._search_filtered(combined, k, version, filters)
            matches = matches_for_row(scores[0], ids[0], version.manifest, root_path)
            attach_duplicates([{"matches": matches}], duplicates)
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
        return JSONResponse(
            {
                "index_version": version.name,
                "demo": self.demo,
                "results": [{"combined": parts, "matches": matches}],
                **partial_fields(missing),
            }
        )

    async def search_vectors(self, request: Request) -> Response:
        """JSON vectors in (the seed's Search API), the usual results shape out: one entry per vector."""
        dim = int(self.model["embedding_dim"])
        filters = parse_filters(request.query_params)
        limit = vector_body_limit(self.limits.max_queries, dim)
        body = await read_body(request.headers.get("content-length"), request.stream(), limit)
        query = parse_vector_body(body, dim, self.limits.max_queries, self.limits.default_k, self.limits.max_k)
        root_path = str(request.scope.get("root_path", "")).rstrip("/")
        queries = [Query("vector", position) for position in range(len(query.vectors))]
        with self.index.lease() as version:
            scores, ids, duplicates, missing = await self._search_filtered(query.vectors, query.k, version, filters)
            entries = result_entries(queries, scores, ids, version.manifest, root_path)
            attach_duplicates(entries, duplicates)
        return JSONResponse({"index_version": version.name, "results": entries, **partial_fields(missing)})

    async def similar(self, request: Request) -> Response:
        """GET /images/{id}/similar: the k nearest other images to an indexed one, by its stored vector."""
        image_id = parse_image_id(request.path_params["image_id"])
        k = parse_k(request.query_params.get("k"), self.limits.default_k, self.limits.max_k)
        filters = parse_filters(request.query_params)
        root_path = str(request.scope.get("root_path", "")).rstrip("/")
        with self.index.lease() as version:
            self._record(image_id, version.manifest)  # unknown or removed: 404
            stored = await self.searcher.stored_vectors(np.asarray([image_id], dtype=np.int64), version.name)
            (found, vectors), lost = stored.value, stored.missing
            if not bool(found[0]):
                if lost:  # allow_partial, and the shard holding this image did not answer
                    raise ShardUnavailable("The index shard holding this image did not answer; try again in a moment.")
                raise RuntimeError(f"the Searcher holds no vector for live id {image_id} of {version.name}")
            scores, ids, duplicates, missing = await self._search_filtered(
                vectors, k, version, filters, exclude=image_id
            )
            entries = result_entries([Query("id", image_id)], scores, ids, version.manifest, root_path)
            attach_duplicates(entries, duplicates)
        return JSONResponse(
            {"index_version": version.name, "demo": self.demo, "results": entries, **partial_fields(missing)}
        )

    async def folders(self, request: Request) -> Response:
        """GET /folders: the first-level folders of the served version with their live image counts."""
        with self.index.lease() as version:
            cached = self.folder_counts.get(version.name)
            if cached is None:
                cached = await asyncio.to_thread(folders, version.manifest.live())
                self.folder_counts = {version.name: cached}  # the served version's only: one entry
            listed, top = cached
        return JSONResponse({"index_version": version.name, "folders": listed, "top_level_images": top})

    async def duplicates(self, request: Request) -> Response:
        """GET /duplicates: groups of near-duplicate images of the served version (one range search of
        the index per version and threshold, cached in the Searcher; groups cached here)."""
        threshold, limit, offset = parse_duplicates_query(request.query_params, self.limits.dedup_cosine)
        with self.index.lease() as version:
            key = (version.name, threshold)
            cached = self.duplicate_groups.get(key)
            if cached is None:
                found = await self.searcher.duplicate_pairs(version.name, threshold)
                groups = await asyncio.to_thread(group_pairs, found.pairs.tolist())
                cached = (groups, bool(found.complete))
                self.duplicate_groups = {k: v for k, v in self.duplicate_groups.items() if k[0] == version.name}
                self.duplicate_groups[key] = cached
            groups, complete = cached
            page = describe_page(groups, version.manifest, limit, offset)
        return JSONResponse(
            {
                "index_version": version.name,
                "threshold": threshold,
                "complete": complete,
                "total_groups": len(groups),
                "offset": offset,
                "limit": limit,
                "groups": page,
            }
        )

    async def embed(self, request: Request) -> Response:
        """Photos and texts in (the seed's Embedding API), unit vectors out, in request order."""
        form = await self._read_form(request)
        prepared = await self._prepare_all(form.uploads)
        texts = [self._checked_text(query) for query in form.texts]
        pixels = [item for item in prepared if isinstance(item, np.ndarray)]
        usable = [query.text for query in texts if query.error is None]
        queries = [
            *(
                Query("filename", upload.filename, item if isinstance(item, ClientError) else None)
                for upload, item in zip(form.uploads, prepared, strict=True)
            ),
            *(Query("text", query.text, query.error) for query in texts),
        ]
        if not pixels and not usable:
            first = next(query.error for query in queries if query.error is not None)
            return service_error_response(first, {"embeddings": error_entries(queries)})
        image_vectors, text_answers = await asyncio.gather(self._embed(pixels), self._embed_texts(usable))
        vectors = iter([*image_vectors, *(answer["vector"] for answer in text_answers)])
        truncated = iter([*(False for _ in image_vectors), *(bool(answer["truncated"]) for answer in text_answers)])
        embeddings = []
        for query in queries:
            entry: dict[str, Any] = {query.kind: query.name}
            if query.error is not None:
                entry["error"] = query.error.to_dict()
            else:
                entry["vector"] = [float(x) for x in next(vectors)]
                if next(truncated):
                    entry["truncated"] = True
            embeddings.append(entry)
        return JSONResponse(
            {
                "model": self.model["name"],
                "dim": int(self.model["embedding_dim"]),
                "precision": self.model["precision"],
                "embeddings": embeddings,
            }
        )

    async def add_images(self, request: Request) -> Response:
        """POST /images: add or replace images (serve_app/writes/routes.py has the steps)."""
        self.writes.check(request)
        wait = parse_wait(request.query_params.get("wait"))
        uploads, keys = await read_upload_form(request, self.limits)
        prepared = await self._prepare_all(uploads)
        puts = [self.writes.put_for(u, item, key) for u, item, key in zip(uploads, prepared, keys, strict=True)]
        return await self.writes.add(uploads, puts, prepared, self._embed, wait)

    async def delete_image(self, request: Request) -> Response:
        """DELETE /images/{id}: remove an image from the index and the collection."""
        self.writes.check(request)
        wait = parse_wait(request.query_params.get("wait"))
        return await self.writes.delete(parse_image_id(request.path_params["image_id"]), wait)

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
        self._check_pixel_budget(uploads)
        prepared = await asyncio.gather(*(self._prepare_in_slot(upload) for upload in uploads))
        for item in prepared:
            self.metrics.count_file(item.code if isinstance(item, ClientError) else "ok")
        return list(prepared)

    def _stack(self, vectors: list[np.ndarray]) -> np.ndarray:
        """(n, dim) float32, also for n = 0 (a request with photos only, or texts only)."""
        if not vectors:
            return np.empty((0, int(self.model["embedding_dim"])), dtype=np.float32)
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

    def _check_pixel_budget(self, uploads: list[Upload]) -> None:
        """All files of a request together decode to at most max_request_pixels (read from headers)."""
        sizes = [
            decoded_pixels(bytes(upload.data), self.spec.shortest_edge) for upload in uploads if upload.error is None
        ]
        # A file over max_pixels is never decoded (that file's own 413): it costs the request nothing.
        total = sum(size for size in sizes if size <= self.limits.max_pixels)
        if total > self.limits.max_request_pixels:
            raise TooManyRequestPixels(
                f"The files of this request would decode to {total:,} pixels; a request may use at most "
                f"{self.limits.max_request_pixels:,}. Send fewer or smaller images per request."
            )

    async def _prepare_in_slot(self, upload: Upload) -> np.ndarray | ClientError:
        """At most max_concurrent_decodes decodes run at once in this replica, whatever the requests."""
        async with self.decode_slots:
            return await asyncio.to_thread(self._prepare, upload)

    def _prepare(self, upload: Upload) -> np.ndarray | ClientError:
        if upload.error is not None:
            return upload.error
        try:
            return pixels_from_bytes(bytes(upload.data), self.spec, upload.filename, self.limits.max_pixels)
        except ClientError as exc:
            return exc

    async def image(self, request: Request) -> Response:
        image_id = parse_image_id(request.path_params["image_id"])
        with self.index.lease() as version:
            record = self._record(image_id, version.manifest)
            images = self.index.images(version)
        size_param = request.query_params.get("size")
        size = parse_thumbnail_size(size_param, self.args.thumbnail_sizes) if size_param is not None else None
        etag = f'"{record.sha256[:32]}"' if size is None else f'"{record.sha256[:32]}-{size}"'
        headers = {"ETag": etag, "Cache-Control": IMAGE_CACHE_CONTROL}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        if size is None:
            # Streamed in chunks (never read whole unless small enough to verify whole first).
            chunks = await asyncio.to_thread(original_chunks, images, record)
            media_type = mimetypes.guess_type(record.key)[0] or "application/octet-stream"
            headers["Content-Length"] = str(record.size)
            return StreamingResponse(chunks, media_type=media_type, headers=headers)
        thumbnail = self.thumbnails.get((record.sha256, size))
        if thumbnail is None:
            thumbnail = await asyncio.to_thread(
                cached_thumbnail,
                self.thumbnail_disk,
                record.sha256,
                size,
                lambda: self._make_thumbnail(images, record, size),
            )
            self.thumbnails.put((record.sha256, size), thumbnail)
        return Response(thumbnail, media_type="image/jpeg", headers=headers)

    @staticmethod
    def _record(image_id: int, manifest: RecordLookup) -> ImageRecord:
        """The record under this stable id in the served version; a removed id is 404, never another image."""
        record = manifest.record(image_id)
        if record is None:
            raise ImageNotFound(f"There is no indexed image with id {image_id}.")
        return record

    def _make_thumbnail(self, images: Store, record: ImageRecord, size: int) -> bytes:
        data = read_verified(images, record)  # the record's bytes, or 409/500: a cached thumbnail is the record's
        try:
            return make_thumbnail(data, size, self.limits.max_pixels)
        except ClientError as exc:
            # Our own collection holds a file that no longer decodes (or grew past max_pixels).
            logger.error("indexed image %s does not make a thumbnail: %s: %s", record.key, exc.code, exc.message)
            raise IndexedImageUnreadable("This indexed image cannot be shown right now.") from None
