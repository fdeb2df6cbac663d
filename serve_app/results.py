"""Pure request/response logic of a search: parsing `k`, turning FAISS rows into matches."""

from __future__ import annotations

from typing import Any

import numpy as np

from image_search.errors import ClientError, InvalidK
from image_search.manifest import Manifest
from serve_app.config import UploadLimits

THUMBNAIL_SIZE_FOR_RESULTS = 256


def parse_k(raw: str | None, limits: UploadLimits) -> int:
    """`k` from the query string: absent -> default; otherwise an integer in 1..max_k."""
    if raw is None:
        return limits.default_k
    text = raw.strip()
    if not text.isdigit() or len(text) > 6:
        raise InvalidK(f"k must be a whole number from 1 to {limits.max_k}; got {raw[:20]!r}.")
    k = int(text)
    if not 1 <= k <= limits.max_k:
        raise InvalidK(f"k must be from 1 to {limits.max_k}; got {k}.")
    return k


def image_url(image_id: int, root_path: str = "") -> str:
    return f"{root_path}/images/{image_id}"


def matches_for_row(
    scores: np.ndarray, ids: np.ndarray, manifest: Manifest, root_path: str = ""
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


def error_entry(filename: str, error: ClientError) -> dict[str, Any]:
    return {"filename": filename, "error": error.to_dict()}
