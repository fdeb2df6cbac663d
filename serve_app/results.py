"""Assembling a search's JSON answer: one entry per query, FAISS rows turned into matches.

Pure functions of the queries, the FAISS answer and the version's records; tested without Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from image_search.errors import ClientError
from serve_app.version_records import RecordLookup

THUMBNAIL_SIZE_FOR_RESULTS = 256


@dataclass(frozen=True)
class Query:
    """One entry of `results`: what was asked (`kind` "filename" or "text", and its name) and, if refused, why."""

    kind: str
    name: str | int  # a file name or text; a vector's position in its request
    error: ClientError | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"truncated": True} for a long text


def image_url(image_id: int, root_path: str = "") -> str:
    return f"{root_path}/images/{image_id}"


def matches_for_row(
    scores: np.ndarray, ids: np.ndarray, manifest: RecordLookup, root_path: str = ""
) -> list[dict[str, Any]]:
    """One query's hits, best first; FAISS pads with id -1 when fewer than k vectors exist.

    Ids are the stable record ids of the manifest's version (the Searcher searched that version).
    `root_path` is the application's route prefix, so the URLs work when it is not served at /.
    """
    matches = []
    for score, image_id in zip(scores.tolist(), ids.tolist(), strict=True):
        record = manifest.record(int(image_id)) if image_id >= 0 else None
        if record is None:
            continue
        matches.append(
            {
                "id": int(image_id),
                "path": record.key,
                "url": image_url(image_id, root_path),
                "thumbnail_url": f"{image_url(image_id, root_path)}?size={THUMBNAIL_SIZE_FOR_RESULTS}",
                "score": round(float(score), 6),
            }
        )
    return matches


def result_entries(
    queries: Sequence[Query], scores: np.ndarray, ids: np.ndarray, manifest: RecordLookup, root_path: str = ""
) -> list[dict[str, Any]]:
    """The `results` list, in request order; row i of scores/ids answers the i-th query without an error."""
    entries: list[dict[str, Any]] = []
    row = 0
    for query in queries:
        entry: dict[str, Any] = {query.kind: query.name, **query.extra}
        if query.error is not None:
            entry["error"] = query.error.to_dict()
        else:
            entry["matches"] = matches_for_row(scores[row], ids[row], manifest, root_path)
            row += 1
        entries.append(entry)
    if row != len(scores):
        raise ValueError(f"{len(scores)} FAISS rows for {row} answered queries")
    return entries


def error_entries(queries: Sequence[Query]) -> list[dict[str, Any]]:
    """The `results` of a search where every query failed: each one's error, in request order."""
    return [
        {query.kind: query.name, **query.extra, "error": query.error.to_dict()}
        for query in queries
        if query.error is not None
    ]
