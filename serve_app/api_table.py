"""The service's routes, described once: the Ingress builds its Starlette routes from this table, and
/openapi.json is generated from the same entries (serve_app/openapi.py), so the schema cannot drift
from what is served. Limits in the descriptions come from the running configuration.

An `Endpoint` names its handler (a method of the Ingress), its parameters, its request body and every
status it may answer with the error codes behind each. Adding a route means adding an entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.routing import Route

from serve_app.config import AppArgs
from serve_app.queries.duplicates import (
    DEFAULT_DUPLICATE_LIMIT,
    MAX_DUPLICATE_LIMIT,
    MAX_DUPLICATE_OFFSET,
    MIN_DUPLICATE_THRESHOLD,
)
from serve_app.queries.filters import MAX_PREFIX_CHARS, MAX_PREFIXES

JSON = "application/json"
MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class Param:
    name: str
    location: str  # "query" | "path"
    schema: dict[str, Any]
    description: str
    required: bool = False
    repeated: bool = False


@dataclass(frozen=True)
class Answer:
    """One status a route may answer: a description, the body's schema reference, and its error codes."""

    description: str
    schema: str | None = None  # a component name; None: the error shape (or no body for 304)
    media_type: str = JSON
    codes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Endpoint:
    path: str
    method: str
    handler: str  # the Ingress method that answers it
    summary: str
    tag: str
    params: tuple[Param, ...] = ()
    body: dict[str, dict[str, Any]] | None = None  # media type -> schema
    answers: dict[int, Answer] = field(default_factory=dict)
    in_schema: bool = True


UNAVAILABLE = Answer(
    "Overloaded, timed out or restarting; retry after Retry-After seconds.",
    codes=("overloaded", "timeout", "unavailable"),
)


def k_param(args: AppArgs) -> Param:
    limits = args.limits
    return Param(
        "k",
        "query",
        {"type": "integer", "minimum": 1, "maximum": limits.max_k, "default": limits.default_k},
        f"Matches per query, 1..{limits.max_k} (default {limits.default_k}).",
    )


def filter_params(args: AppArgs) -> tuple[Param, ...]:
    """prefix / min_score / dedup: the filters every search route takes (serve_app/queries/filters.py)."""
    return (
        Param(
            "prefix",
            "query",
            {"type": "string", "minLength": 1, "maxLength": MAX_PREFIX_CHARS},
            f"Only images whose key starts with one of these (a folder, e.g. `holidays/`); "
            f"repeatable, at most {MAX_PREFIXES}. Applied inside the index scan: k come back whenever "
            "at least k images match.",
            repeated=True,
        ),
        Param(
            "min_score",
            "query",
            {"type": "number", "minimum": -1, "maximum": 1},
            "Drop matches scoring (cosine) below this: an answer may then hold fewer than k.",
        ),
        Param(
            "dedup",
            "query",
            {"type": "boolean", "default": False},
            f"Collapse near-duplicates (cosine >= {args.limits.dedup_cosine}) into the best-scoring match, "
            "which lists the others' ids under `duplicates`; k distinct groups when the collection has them.",
        ),
    )


FILTER_ERRORS = {
    422: ("invalid_filter",),
    413: ("filter_too_large",),
}


def with_filter_errors(answers: dict[int, Answer]) -> dict[int, Answer]:
    """The answers of a search route, with the filter parameters' error codes added."""
    out = dict(answers)
    for status, codes in FILTER_ERRORS.items():
        base = out.get(status, Answer("A bad filter value." if status == 422 else "Too large."))
        out[status] = Answer(base.description, base.schema, base.media_type, (*base.codes, *codes))
    return dict(sorted(out.items()))


def form_body(args: AppArgs, weights: bool) -> dict[str, dict[str, Any]]:
    limits = args.limits
    properties: dict[str, Any] = {
        "files": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "maxItems": limits.max_files,
            "description": f"Photos, at most {limits.max_files} of at most {limits.max_file_bytes} bytes each.",
        },
        "text": {
            "type": "array",
            "items": {"type": "string", "maxLength": limits.max_text_chars},
            "maxItems": limits.max_texts,
            "description": f"Phrases, at most {limits.max_texts} of at most {limits.max_text_chars} characters.",
        },
    }
    if weights:
        number = {
            "type": "array",
            "items": {"type": "string", "pattern": r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?$"},
        }
        properties["file_weight"] = {**number, "description": "One weight per file, in order (default +1 each)."}
        properties["text_weight"] = {**number, "description": "One weight per text, in order (default +1 each)."}
    text_only = {key: value for key, value in properties.items() if key != "files" and key != "file_weight"}
    return {
        MULTIPART: {"type": "object", "properties": properties},
        URLENCODED: {"type": "object", "properties": text_only},
    }


def search_answers(schema: str) -> dict[int, Answer]:
    return {
        200: Answer("One entry per file, then per text, in request order.", schema),
        400: Answer(
            "Every query failed, or the request is malformed (the first failure's error; `results` lists each).",
            codes=(
                "empty_file",
                "not_an_image",
                "corrupt_image",
                "empty_text",
                "invalid_text",
                "malformed_request",
                "no_query",
                "text_search_unavailable",
            ),
        ),
        413: Answer(
            "Too large: the request, a file, its pixels, a text, or too many of them.",
            codes=(
                "request_too_large",
                "file_too_large",
                "too_many_pixels",
                "too_many_files",
                "too_many_fields",
                "text_too_long",
                "too_many_texts",
                "too_many_queries",
                "too_many_pixels_in_request",
            ),
        ),
        415: Answer(
            "Not a form, or an image format that is not supported.", codes=("not_multipart", "unsupported_format")
        ),
        422: Answer("A bad value: `k`, or weights.", codes=("invalid_k", "invalid_weights", "zero_query")),
        503: UNAVAILABLE,
    }


WRITE_AUTH = {
    401: Answer(
        "No or a wrong 'Authorization: Bearer <write token>' (WWW-Authenticate: Bearer).", codes=("unauthorized",)
    ),
    403: Answer("Writes are off: no write token is configured.", codes=("writes_disabled",)),
}
WRITE_STORE = {
    503: Answer(
        "Overloaded, restarting, the store unwritable, or a CLI builder holding the index; retry after Retry-After.",
        codes=("overloaded", "timeout", "unavailable", "store_unavailable", "writer_busy"),
    ),
    507: Answer("The store has no space left; nothing of the request was stored.", codes=("store_full",)),
}


def wait_param() -> Param:
    return Param(
        "wait",
        "query",
        {"type": "string", "enum": ["indexed", "stored"], "default": "indexed"},
        "indexed: answer once this service serves the change (201/200); stored: once it is durable and "
        "committed (202), possibly before it is served.",
    )


def write_endpoints(args: AppArgs, image_id: Param) -> list[Endpoint]:
    limits = args.limits
    upload_errors = search_answers("WriteAnswer")
    return [
        Endpoint(
            "/images",
            "POST",
            "add_images",
            "Add or replace images in the collection (needs the write token).",
            "images",
            params=(wait_param(),),
            body={
                MULTIPART: {
                    "type": "object",
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "maxItems": limits.max_files,
                            "description": f"Images, at most {limits.max_files} of at most "
                            f"{limits.max_file_bytes} bytes each.",
                        },
                        "key": {
                            "type": "array",
                            "items": {"type": "string", "maxLength": 512},
                            "description": "One key per file, in order (e.g. products/123.jpg); missing: "
                            "uploads/<sha256 prefix>.<ext>.",
                        },
                    },
                }
            },
            answers={
                201: Answer("Committed and served here: one entry (or error) per file.", "WriteAnswer"),
                202: Answer("Committed (durable) in index_version; served soon.", "WriteAnswer"),
                400: Answer(
                    "No file is usable, or the request is malformed (the first failure; `results` lists each).",
                    codes=("empty_file", "not_an_image", "corrupt_image", "malformed_request", "no_files"),
                ),
                413: upload_errors[413],
                415: upload_errors[415],
                422: Answer("A bad key or wait.", codes=("invalid_key", "invalid_wait")),
                **WRITE_AUTH,
                **WRITE_STORE,
            },
        ),
        Endpoint(
            "/images/{image_id}",
            "DELETE",
            "delete_image",
            "Remove an image from the index and the collection (needs the write token).",
            "images",
            params=(image_id, wait_param()),
            answers={
                200: Answer("Removed, and this service no longer serves it.", "DeleteAnswer"),
                202: Answer("Removed (durable) in index_version; served soon.", "DeleteAnswer"),
                404: Answer("No indexed image has this id (never indexed, or removed).", codes=("not_found",)),
                422: Answer("A bad wait.", codes=("invalid_wait",)),
                **WRITE_AUTH,
                **WRITE_STORE,
            },
        ),
    ]


def endpoints(args: AppArgs, dim: int) -> list[Endpoint]:
    limits = args.limits
    k = k_param(args)
    image_id = Param("image_id", "path", {"type": "integer", "minimum": 0}, "A stable image id.", required=True)
    filters = filter_params(args)
    return [
        Endpoint(
            "/", "GET", "page", "The search page.", "page", answers={200: Answer("The page.", "Page", "text/html")}
        ),
        Endpoint(
            "/search",
            "POST",
            "search",
            "Search with photos and/or texts: one result list per query.",
            "search",
            params=(k, *filters),
            body=form_body(args, weights=False),
            answers=with_filter_errors(search_answers("SearchAnswer")),
        ),
        Endpoint(
            "/search",
            "GET",
            "search_text",
            "Search with one text (for links and scripts).",
            "search",
            params=(
                Param(
                    "q",
                    "query",
                    {"type": "string", "minLength": 1, "maxLength": limits.max_text_chars},
                    "The text.",
                    required=True,
                ),
                k,
                *filters,
            ),
            answers=with_filter_errors(
                {key: value for key, value in search_answers("SearchAnswer").items() if key != 415}
            ),
        ),
        Endpoint(
            "/search/combined",
            "POST",
            "search_combined",
            "One result list for the normalised weighted sum of photos and texts.",
            "search",
            params=(k, *filters),
            body=form_body(args, weights=True),
            answers=with_filter_errors(search_answers("CombinedAnswer")),
        ),
        Endpoint(
            "/search/vectors",
            "POST",
            "search_vectors",
            "The Search API: vectors in, one result list per vector out.",
            "search",
            params=filters,
            body={
                JSON: {
                    "type": "object",
                    "required": ["vectors"],
                    "additionalProperties": False,
                    "properties": {
                        "vectors": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": limits.max_queries,
                            "items": {"type": "array", "minItems": dim, "maxItems": dim, "items": {"type": "number"}},
                        },
                        "k": {"type": "integer", "minimum": 1, "maximum": limits.max_k},
                    },
                }
            },
            answers=with_filter_errors(
                {
                    200: Answer("One entry per vector (`vector`: its position).", "SearchAnswer"),
                    400: Answer("Not the JSON object this route takes.", codes=("invalid_json",)),
                    413: Answer(
                        "Too many vectors, or a body over the limit.", codes=("too_many_queries", "request_too_large")
                    ),
                    422: Answer(
                        "Vectors of another dimension, not finite, of zero length; a bad k or filter.",
                        codes=("invalid_vectors", "invalid_k"),
                    ),
                    503: UNAVAILABLE,
                }
            ),
        ),
        Endpoint(
            "/embed",
            "POST",
            "embed",
            "The Embedding API: photos and/or texts in, unit vectors out, in request order.",
            "embed",
            body=form_body(args, weights=False),
            answers={
                **{key: value for key, value in search_answers("EmbedAnswer").items() if key != 422},
                200: Answer("One embedding (or error) per file, then per text.", "EmbedAnswer"),
            },
        ),
        Endpoint(
            "/images/{image_id}",
            "GET",
            "image",
            "An indexed image's bytes, or a JPEG thumbnail with `size`.",
            "images",
            params=(
                image_id,
                Param(
                    "size",
                    "query",
                    {"type": "integer", "enum": list(args.thumbnail_sizes)},
                    "Thumbnail edge in pixels.",
                ),
            ),
            answers={
                200: Answer("The image (its own type; thumbnails are JPEG).", "Binary", "image/*"),
                304: Answer("Not modified (If-None-Match matched the ETag)."),
                404: Answer("No indexed image has this id (never indexed, or removed).", codes=("not_found",)),
                409: Answer(
                    "The file behind the id no longer holds the indexed bytes (edited, or a link out of the "
                    "collection): never served under the record's ETag.",
                    codes=("indexed_image_changed",),
                ),
                422: Answer("A size that is not offered.", codes=("invalid_size",)),
                500: Answer(
                    "An image of our own collection no longer reads (logged).", codes=("indexed_image_unreadable",)
                ),
                503: UNAVAILABLE,
            },
        ),
        *write_endpoints(args, image_id),
        Endpoint(
            "/images/{image_id}/similar",
            "GET",
            "similar",
            "More like this: the k nearest other images to an indexed one (itself excluded).",
            "search",
            params=(image_id, k, *filters),
            answers=with_filter_errors(
                {
                    200: Answer("One entry (`id`: the image asked about) with its matches.", "SearchAnswer"),
                    404: Answer("No indexed image has this id (never indexed, or removed).", codes=("not_found",)),
                    422: Answer("A bad id, k or filter.", codes=("invalid_k",)),
                    503: UNAVAILABLE,
                }
            ),
        ),
        Endpoint(
            "/folders",
            "GET",
            "folders",
            "The first-level folders (prefixes for `prefix`) of the served version, with live image counts.",
            "search",
            answers={200: Answer("Folders, sorted, and the count of images outside any folder.", "Folders")},
        ),
        Endpoint(
            "/duplicates",
            "GET",
            "duplicates",
            "Groups of near-duplicate images of the collection, byte-identical members marked.",
            "search",
            params=(
                Param(
                    "threshold",
                    "query",
                    {"type": "number", "minimum": MIN_DUPLICATE_THRESHOLD, "maximum": 1},
                    f"Cosine at or above which two images are near-duplicates (default {limits.dedup_cosine}).",
                ),
                Param(
                    "limit",
                    "query",
                    {"type": "integer", "minimum": 1, "maximum": MAX_DUPLICATE_LIMIT},
                    f"Groups per page (default {DEFAULT_DUPLICATE_LIMIT}).",
                ),
                Param(
                    "offset",
                    "query",
                    {"type": "integer", "minimum": 0, "maximum": MAX_DUPLICATE_OFFSET},
                    "Groups to skip (groups are ordered by their lowest id).",
                ),
            ),
            answers={
                200: Answer("A page of groups, from one index version.", "Duplicates"),
                422: Answer("A bad threshold, limit or offset.", codes=("invalid_duplicates_query",)),
                503: UNAVAILABLE,
            },
        ),
        Endpoint(
            "/healthz",
            "GET",
            "healthz",
            "ok / degraded (200) or unavailable (503), per deployment.",
            "service",
            answers={200: Answer("Healthy or degraded.", "Health"), 503: Answer("Unavailable.", "Health")},
        ),
        Endpoint(
            "/info",
            "GET",
            "info",
            "What is served: model, index, limits.",
            "service",
            answers={200: Answer("The service.", "Info")},
        ),
        Endpoint(
            "/openapi.json",
            "GET",
            "openapi",
            "This schema.",
            "service",
            answers={200: Answer("OpenAPI 3.0.", "Object")},
        ),
        Endpoint(
            "/docs",
            "GET",
            "docs",
            "Interactive API documentation (Swagger UI).",
            "service",
            answers={200: Answer("The page.", "Page", "text/html")},
        ),
    ]


def starlette_routes(table: Sequence[Endpoint], handlers: object) -> list[Route]:
    """One Route per path, methods of one path merged where they share a handler; order kept."""
    routes = []
    for endpoint in table:
        handler: Callable[..., Any] = getattr(handlers, endpoint.handler)
        routes.append(Route(endpoint.path, handler, methods=[endpoint.method]))
    return routes
