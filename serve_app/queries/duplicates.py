"""GET /duplicates: its query string, and a page of groups built from the Searcher's pairs.

`threshold` (a cosine, `MIN_DUPLICATE_THRESHOLD`..1, default the `dedup_cosine` setting) decides
which images are near-duplicates; below the minimum almost every pair of a collection would match,
and the work and the answer would grow with the square of the collection. Groups come from
serve_app/queries/duplicate_groups.py (byte-identical members marked by sha256), ordered by their
first id, paged with `limit` (at most `MAX_DUPLICATE_LIMIT`) and `offset`.
"""

from __future__ import annotations

import math
from typing import Any

from starlette.datastructures import QueryParams

from image_search.errors import ClientError
from serve_app.queries.duplicate_groups import describe_group
from serve_app.version_records import RecordLookup

MIN_DUPLICATE_THRESHOLD = 0.8
DEFAULT_DUPLICATE_LIMIT = 50
MAX_DUPLICATE_LIMIT = 500
MAX_DUPLICATE_OFFSET = 10**9


class InvalidDuplicatesQuery(ClientError):
    status = 422
    code = "invalid_duplicates_query"


def parse_duplicates_query(params: QueryParams, default_threshold: float) -> tuple[float, int, int]:
    """(threshold, limit, offset) or a 422 naming the bad one."""
    raw = params.get("threshold")
    threshold = max(default_threshold, MIN_DUPLICATE_THRESHOLD) if raw is None else _number(raw)
    if not math.isfinite(threshold) or not MIN_DUPLICATE_THRESHOLD <= threshold <= 1.0:
        raise InvalidDuplicatesQuery(f"threshold must be a cosine from {MIN_DUPLICATE_THRESHOLD} to 1.")
    limit = _whole(params.get("limit"), DEFAULT_DUPLICATE_LIMIT, 1, MAX_DUPLICATE_LIMIT, "limit")
    offset = _whole(params.get("offset"), 0, 0, MAX_DUPLICATE_OFFSET, "offset")
    return threshold, limit, offset


def _number(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise InvalidDuplicatesQuery(f"threshold must be a cosine from {MIN_DUPLICATE_THRESHOLD} to 1.") from None


def _whole(raw: str | None, default: int, low: int, high: int, name: str) -> int:
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or not low <= int(raw) <= high:
        raise InvalidDuplicatesQuery(f"{name} must be a whole number from {low} to {high}.")
    return int(raw)


def describe_page(groups: list[list[int]], records: RecordLookup, limit: int, offset: int) -> list[dict[str, Any]]:
    page = groups[offset : offset + limit]
    members = {image_id for group in page for image_id in group}
    found = {image_id: records.record(image_id) for image_id in members}
    sha = {image_id: record.sha256 for image_id, record in found.items() if record is not None}
    path = {image_id: record.key for image_id, record in found.items() if record is not None}
    if len(sha) != len(members):
        raise RuntimeError("the Searcher found duplicate ids that the served version has no record of")
    return [describe_group(group, sha, path) for group in page]
