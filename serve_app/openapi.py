"""The OpenAPI 3.0 document of the service, generated from the route table (serve_app/api_table.py).

Response bodies are described by a few shared components: the error shape every 4xx/5xx answers
with (`Error`), and the answers of the search, embed, health and info routes. Error statuses list
the codes they carry in their description, so a client knows what to expect by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serve_app.api_table import JSON, Answer, Endpoint, Param

OPENAPI_VERSION = "3.0.3"
ERROR_DETAIL = {
    "type": "object",
    "required": ["code", "message"],
    "properties": {
        "code": {"type": "string"},
        "message": {"type": "string"},
        "filename": {"type": "string", "nullable": True},
    },
}
ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"$ref": "#/components/schemas/ErrorDetail"},
        "results": {"type": "array", "items": {"type": "object"}},
        "embeddings": {"type": "array", "items": {"type": "object"}},
    },
}
MATCH = {
    "type": "object",
    "required": ["id", "path", "url", "thumbnail_url", "score"],
    "properties": {
        "id": {"type": "integer"},
        "path": {"type": "string"},
        "url": {"type": "string"},
        "thumbnail_url": {"type": "string"},
        "score": {"type": "number"},
        "duplicates": {"type": "array", "items": {"type": "integer"}},
    },
}
QUERY_ERROR = {"$ref": "#/components/schemas/ErrorDetail"}
# Only with searcher.allow_partial, when a shard did not answer in time: the others' merged answer.
PARTIAL = {
    "partial": {"type": "boolean", "description": "true: some index shards did not answer; matches are the others'"},
    "missing_shards": {"type": "array", "items": {"type": "integer"}},
}
ENTRY = {
    "type": "object",
    "properties": {
        "filename": {"type": "string"},
        "text": {"type": "string"},
        "vector": {"type": "integer"},
        "id": {"type": "integer"},
        "truncated": {"type": "boolean"},
        "matches": {"type": "array", "items": {"$ref": "#/components/schemas/Match"}},
        "error": QUERY_ERROR,
    },
}
COMPONENTS: dict[str, Any] = {
    "Error": ERROR,
    "ErrorDetail": ERROR_DETAIL,
    "Match": MATCH,
    "SearchAnswer": {
        "type": "object",
        "required": ["index_version", "results"],
        "properties": {
            "index_version": {"type": "string"},
            "results": {"type": "array", "items": ENTRY},
            **PARTIAL,
        },
    },
    "CombinedAnswer": {
        "type": "object",
        "required": ["index_version", "results"],
        "properties": {
            "index_version": {"type": "string"},
            "results": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "combined": {"type": "array", "items": {"type": "object"}},
                        "matches": {"type": "array", "items": {"$ref": "#/components/schemas/Match"}},
                    },
                },
            },
            **PARTIAL,
        },
    },
    "EmbedAnswer": {
        "type": "object",
        "required": ["model", "dim", "precision", "embeddings"],
        "properties": {
            "model": {"type": "string"},
            "dim": {"type": "integer"},
            "precision": {"type": "string"},
            "embeddings": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "filename": {"type": "string"},
                        "text": {"type": "string"},
                        "vector": {"type": "array", "items": {"type": "number"}},
                        "truncated": {"type": "boolean"},
                        "error": QUERY_ERROR,
                    },
                },
            },
        },
    },
    "WriteAnswer": {
        "type": "object",
        "required": ["index_version", "results"],
        "properties": {
            "index_version": {"type": "string"},
            "results": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "filename": {"type": "string"},
                        "key": {"type": "string"},
                        "id": {"type": "integer"},
                        "status": {"type": "string", "enum": ["added", "replaced", "unchanged"]},
                        "error": QUERY_ERROR,
                    },
                },
            },
        },
    },
    "DeleteAnswer": {
        "type": "object",
        "required": ["index_version", "id", "key", "status"],
        "properties": {
            "index_version": {"type": "string"},
            "id": {"type": "integer"},
            "key": {"type": "string"},
            "status": {"type": "string", "enum": ["deleted"]},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ok", "degraded", "unavailable"]}},
    },
    "Info": {
        "type": "object",
        "required": ["model", "embedding_dim", "index_version"],
        "properties": {
            "shards": {"type": "integer", "description": "Searcher shard groups the index is split across"},
            "recall": {
                "type": "object",
                "description": "recall@k measured per segment when it was written (tuned to the target); "
                "min_recall over the segments; met: every approximate segment reached its target with its "
                "tuned search knob (false when searcher.nprobe / ef_search override it)",
                "properties": {
                    "target": {"type": "number"},
                    "min_recall": {"type": "number", "nullable": True},
                    "met": {"type": "boolean"},
                    "overridden": {"type": "object", "nullable": True},
                    "segments": {"type": "array", "items": {"type": "object"}},
                },
            },
        },
    },
    "Duplicates": {
        "type": "object",
        "required": ["index_version", "threshold", "complete", "total_groups", "groups"],
        "properties": {
            "index_version": {"type": "string"},
            "threshold": {"type": "number"},
            "complete": {"type": "boolean"},
            "total_groups": {"type": "integer"},
            "offset": {"type": "integer"},
            "limit": {"type": "integer"},
            "groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["ids", "members", "identical_sets"],
                    "properties": {
                        "ids": {"type": "array", "items": {"type": "integer"}},
                        "members": {"type": "array", "items": {"type": "object"}},
                        "identical_sets": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
                    },
                },
            },
        },
    },
    "Folders": {
        "type": "object",
        "required": ["index_version", "folders", "top_level_images"],
        "properties": {
            "index_version": {"type": "string"},
            "folders": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["prefix", "count"],
                    "properties": {"prefix": {"type": "string"}, "count": {"type": "integer"}},
                },
            },
            "top_level_images": {"type": "integer"},
        },
    },
    "Object": {"type": "object"},
    "Page": {"type": "string"},
    "Binary": {"type": "string", "format": "binary"},
}


def parameter(param: Param) -> dict[str, Any]:
    schema = {"type": "array", "items": param.schema} if param.repeated else param.schema
    doc: dict[str, Any] = {
        "name": param.name,
        "in": param.location,
        "required": param.required or param.location == "path",
        "description": param.description,
        "schema": schema,
    }
    if param.repeated:
        doc.update(style="form", explode=True)
    return doc


def response(answer: Answer, status: int) -> dict[str, Any]:
    description = answer.description
    if answer.codes:
        description += " Error codes: " + ", ".join(f"`{code}`" for code in answer.codes) + "."
    if status == 304:
        return {"description": description}
    schema = answer.schema or ("Error" if status >= 400 else "Object")
    doc: dict[str, Any] = {
        "description": description,
        "content": {
            answer.media_type if status < 400 else JSON: {"schema": {"$ref": f"#/components/schemas/{schema}"}}
        },
    }
    if status == 503:
        doc["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}}
    return doc


def operation(endpoint: Endpoint) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "operationId": f"{endpoint.handler}",
        "summary": endpoint.summary,
        "tags": [endpoint.tag],
        "responses": {str(status): response(answer, status) for status, answer in sorted(endpoint.answers.items())},
    }
    if endpoint.params:
        doc["parameters"] = [parameter(param) for param in endpoint.params]
    if endpoint.body is not None:
        doc["requestBody"] = {
            "required": True,
            "content": {media: {"schema": schema} for media, schema in endpoint.body.items()},
        }
    return doc


def openapi_document(table: Sequence[Endpoint], title: str, version: str, description: str = "") -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in table:
        if endpoint.in_schema:
            paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = operation(endpoint)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {"schemas": COMPONENTS},
    }


REFERENCE_DIM = 512  # CLIP ViT-B/32, the default model


def reference_document() -> dict[str, Any]:
    """The schema of a service with the default configuration and model (the copy committed in docs/)."""
    from serve_app.api_docs import API_DESCRIPTION, SERVICE_VERSION
    from serve_app.api_table import endpoints
    from serve_app.config import AppArgs

    return openapi_document(endpoints(AppArgs(), REFERENCE_DIM), "Image search", SERVICE_VERSION, API_DESCRIPTION)


if __name__ == "__main__":  # python -m serve_app.openapi > docs/openapi.json
    import json

    print(json.dumps(reference_document(), indent=1, sort_keys=True))
