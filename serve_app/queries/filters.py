"""Search filters from the query string (`prefix`, `min_score`, `dedup`) and the id sets they mean.

`prefix` (repeatable) keeps images whose key starts with any of them (a folder or album):
the Ingress turns the prefixes into the set of matching live ids of the version it serves, off
the event loop, and caches it per version and prefix set (`FilterCache`). The set travels to the
Searcher as a packed bitmap (image_search/filtered_search.py `IdFilter`), which applies it inside
the scan: whenever at least k images match, k come back.

`min_score` drops matches scoring below it, so an answer may hold fewer than k (documented).
`dedup=true` collapses near-duplicates (the threshold is the `dedup_cosine` setting).

`folders(records)` counts the live images under each first-level folder, for GET /folders.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from starlette.datastructures import QueryParams

from image_search.errors import ClientError
from image_search.filtered_search import MAX_FILTER_BITMAP_BYTES, IdFilter
from image_search.manifest import ImageRecord
from serve_app.version_records import VersionRecords

MAX_PREFIXES = 16  # prefix values per request
MAX_PREFIX_CHARS = 1024  # characters per prefix (keys are relative paths)
FILTER_CACHE_ENTRIES = 64  # (version, prefix set) -> id filter, per Ingress replica
TRUE_VALUES = ("true", "1", "yes")
FALSE_VALUES = ("false", "0", "no")


class InvalidFilter(ClientError):
    status = 422
    code = "invalid_filter"


class FilterTooLarge(ClientError):
    """The collection's id space is larger than one filter may carry (MAX_FILTER_BITMAP_BYTES)."""

    status = 413
    code = "filter_too_large"


@dataclass(frozen=True)
class SearchFilters:
    prefixes: tuple[str, ...] = ()  # sorted, unique
    min_score: float | None = None
    dedup: bool = False

    @property
    def restricts(self) -> bool:
        return bool(self.prefixes)


def parse_filters(params: QueryParams) -> SearchFilters:
    prefixes = params.getlist("prefix")
    if len(prefixes) > MAX_PREFIXES:
        raise InvalidFilter(f"At most {MAX_PREFIXES} prefix values per request; got {len(prefixes)}.")
    for prefix in prefixes:
        if not prefix or len(prefix) > MAX_PREFIX_CHARS:
            raise InvalidFilter(f"A prefix must be 1 to {MAX_PREFIX_CHARS} characters.")
    return SearchFilters(
        tuple(sorted(set(prefixes))), parse_min_score(params.get("min_score")), parse_bool(params.get("dedup"))
    )


def parse_min_score(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidFilter("min_score must be a number from -1 to 1 (a cosine).") from None
    if not math.isfinite(value) or not -1.0 <= value <= 1.0:
        raise InvalidFilter(f"min_score must be a number from -1 to 1 (a cosine); got {raw[:40]!r}.")
    return value


def parse_bool(raw: str | None, name: str = "dedup") -> bool:
    if raw is None:
        return False
    if raw.lower() in TRUE_VALUES:
        return True
    if raw.lower() in FALSE_VALUES:
        return False
    raise InvalidFilter(f"{name} must be true or false.")


def ids_with_prefix(records: Iterable[ImageRecord], prefixes: tuple[str, ...]) -> np.ndarray:
    return np.asarray([record.id for record in records if record.key.startswith(prefixes)], dtype=np.int64)


def build_filter(records: VersionRecords, prefixes: tuple[str, ...]) -> IdFilter:
    """The live ids under any of the prefixes; with no prefix, every live id (similar-to excludes one)."""
    id_space = int(records.version.next_id)
    if id_space > MAX_FILTER_BITMAP_BYTES * 8:
        raise FilterTooLarge(f"Filters work on collections of at most {MAX_FILTER_BITMAP_BYTES * 8} ids.")
    if not prefixes:
        return IdFilter.of(np.asarray([record.id for record in records.live()], dtype=np.int64), id_space)
    return IdFilter.of(ids_with_prefix(records.live(), prefixes), id_space)


class FilterCache:
    """Id filters by (version, prefixes), built off the event loop; the least recently used go first."""

    def __init__(self, capacity: int = FILTER_CACHE_ENTRIES) -> None:
        self.capacity = capacity
        self.items: OrderedDict[tuple[str, tuple[str, ...]], IdFilter] = OrderedDict()
        self.builds = 0

    async def get(self, records: VersionRecords, prefixes: tuple[str, ...]) -> IdFilter:
        key = (records.name, prefixes)
        found = self.items.get(key)
        if found is not None:
            self.items.move_to_end(key)
            return found
        built = await asyncio.to_thread(build_filter, records, prefixes)
        self.builds += 1
        self.items[key] = built
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)
        return built


def below_min_score(scores: np.ndarray, ids: np.ndarray, min_score: float | None) -> np.ndarray:
    """`ids` with -1 (no match) wherever the score is below min_score."""
    if min_score is None:
        return ids
    return np.where(scores >= np.float32(min_score), ids, -1)


def folders(records: Iterable[ImageRecord]) -> tuple[list[dict[str, object]], int]:
    """([{"prefix": "a/", "count": n}, ...] sorted by prefix, images at the top level)."""
    counts: dict[str, int] = {}
    top = 0
    for record in records:
        head, sep, _ = record.key.partition("/")
        if sep:
            counts[head + "/"] = counts.get(head + "/", 0) + 1
        else:
            top += 1
    return [{"prefix": prefix, "count": counts[prefix]} for prefix in sorted(counts)], top


def attach_duplicates(entries: list[dict[str, object]], duplicates: list[dict[int, list[int]]] | None) -> None:
    """Give each match of a de-duplicated answer its `duplicates` (ids); entries with errors have no row."""
    if duplicates is None:
        return
    rows = iter(duplicates)
    for entry in entries:
        matches = entry.get("matches")
        if not isinstance(matches, list):
            continue
        row = next(rows)
        for match in matches:
            match["duplicates"] = row.get(int(match["id"]), [])
