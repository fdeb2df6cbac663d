"""Top-k over a version's segments restricted to a set of ids, inside the scan (never a post-filter).

A filter (`IdFilter`) is a packed bitmap over the id space [0, next_id): compact enough to cross
Serve's gRPC in one message (`MAX_FILTER_BITMAP_BYTES` bounds it: 16.7M ids in 2 MiB, where a
list of int64 ids would take 8 bytes each) and a vectorised membership test per segment row.

Per segment, the rows that are live in the version and allowed by the filter are found first
(`matching_rows`); then a pure planner (`plan_scan`) picks how to search them:

- `exact`: when few rows match (at most `EXACT_SCAN_MAX_ROWS`), their raw vectors (vectors.npy,
  memory-mapped) are scored with one matrix product. Exact, and cheaper than walking an index
  that would skip almost everything.
- `index`: otherwise the segment's FAISS index is searched with an `IDSelectorBitmap` of the matching
  ids in its search parameters, so the scan skips every other vector. On a Flat segment this is
  still an exact scan; on an IVF segment `nprobe` is raised by 1/selectivity (capped at nlist), so
  the probed lists hold about as many matching vectors as an unfiltered search probes: low
  selectivity is what makes a filtered IVF search lose recall (faiss #4465).

Either way a segment returns min(k, matching) results whenever it has them, and the per-segment
lists merge as in segment_search.py: whenever at least k images match, k come back.

API summary:
- `IdFilter(bitmap, count)`, `IdFilter.of(ids, id_space)`, `.allows(ids) -> bool mask`, `.without(id)`
- `SegmentRows.of(ids, vectors)`: a segment's id per row and its raw vectors; `.rows_of(ids)`
- `ScanPlan`, `plan_scan(matching, total, nprobe, nlist, exact_max) -> ScanPlan` (pure)
- `search_filtered(segments, rows, queries, k, id_filter) -> (scores, ids)` like `search_segments`
- `stored_vectors(segments, rows, ids) -> (found mask, vectors)`: the live vectors of some ids
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from image_search.segment_search import MISSING_ID, SearchableSegment, merge_top_k

EXACT_SCAN_MAX_ROWS = 20_000  # matching rows of a segment scored exactly from raw vectors (~40 MB at dim 512)
MAX_FILTER_BITMAP_BYTES = 2 * 1024 * 1024  # one filter on the wire: ids below 16.7M
MAX_NPROBE_FACTOR = 1_000_000  # selectivity floor for the nprobe raise (nlist caps it anyway)


@dataclass(frozen=True)
class IdFilter:
    """The ids a search may return: bit i of `bitmap` (little-endian bit order) set for id i."""

    bitmap: np.ndarray  # uint8
    count: int  # ids set

    @classmethod
    def of(cls, ids: np.ndarray | Sequence[int], id_space: int) -> IdFilter:
        ids = np.asarray(ids, dtype=np.int64)
        if id_space > MAX_FILTER_BITMAP_BYTES * 8:
            raise ValueError(f"an id filter covers at most {MAX_FILTER_BITMAP_BYTES * 8} ids, not {id_space}")
        if len(ids) and (ids.min() < 0 or ids.max() >= id_space):
            raise ValueError("filter ids must lie in [0, id_space)")
        mask = np.zeros(max(id_space, 1), dtype=bool)
        mask[ids] = True
        return cls(np.packbits(mask, bitorder="little"), int(mask.sum()))

    def allows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < len(self.bitmap) * 8)
        safe = np.where(inside, ids, 0)
        return inside & (((self.bitmap[safe >> 3] >> (safe & 7).astype(np.uint8)) & 1) == 1)

    def without(self, image_id: int) -> IdFilter:
        if not self.allows(np.asarray([image_id]))[0]:
            return self
        bitmap = self.bitmap.copy()
        bitmap[image_id >> 3] &= np.uint8(0xFF ^ (1 << (image_id & 7)))
        return IdFilter(bitmap, self.count - 1)


@dataclass(frozen=True)
class SegmentRows:
    """A segment's stable id per row (as in its IndexIDMap2) and its raw vectors (row i <-> ids[i])."""

    ids: np.ndarray  # int64 (n,)
    vectors: np.ndarray  # float32 (n, dim), memory-mapped
    order: np.ndarray  # argsort of ids, for rows_of
    sorted_ids: np.ndarray  # ids[order]

    @classmethod
    def of(cls, ids: np.ndarray, vectors: np.ndarray) -> SegmentRows:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        order = np.argsort(ids, kind="stable")
        return cls(ids, vectors, order, ids[order])

    def rows_of(self, wanted: np.ndarray) -> np.ndarray:
        """Row of each wanted id, -1 where this segment does not hold it."""
        wanted = np.asarray(wanted, dtype=np.int64)
        if not len(self.ids):
            return np.full(len(wanted), -1, dtype=np.int64)
        at = np.clip(np.searchsorted(self.sorted_ids, wanted), 0, len(self.sorted_ids) - 1)
        return np.where(self.sorted_ids[at] == wanted, self.order[at], -1).astype(np.int64)


@dataclass(frozen=True)
class ScanPlan:
    kind: str  # "skip" (nothing matches), "exact" (raw vectors) or "index" (FAISS with a selector)
    nprobe: int | None = None  # for "index" on IVF segments


def plan_scan(
    matching: int, total: int, nprobe: int | None, nlist: int | None, exact_max: int = EXACT_SCAN_MAX_ROWS
) -> ScanPlan:
    """How to search one segment's `matching` rows out of its `total` (see the module docstring).

    `nprobe`/`nlist` are the segment's IVF knobs, None for an exact (Flat) segment.
    """
    if matching <= 0:
        return ScanPlan("skip")
    if matching <= exact_max:
        return ScanPlan("exact")
    if nprobe is None or nlist is None:
        return ScanPlan("index")  # Flat with a selector: exact, without gathering the rows
    return ScanPlan("index", raise_nprobe(nprobe, nlist, matching, total))


def raise_nprobe(nprobe: int, nlist: int, matching: int, total: int) -> int:
    """nprobe / selectivity, at least nprobe and at most nlist (dead rows sit in the lists too: total)."""
    selectivity = max(matching / max(total, 1), 1.0 / MAX_NPROBE_FACTOR)
    return int(min(nlist, max(nprobe, math.ceil(nprobe / selectivity))))


def ivf_knobs(index: faiss.Index) -> tuple[int | None, int | None]:
    """(nprobe, nlist) of an IVF index, (None, None) for an exact one."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None, None
    return int(ivf.nprobe), int(ivf.nlist)


def matching_rows(segment: SearchableSegment, rows: SegmentRows, id_filter: IdFilter) -> np.ndarray:
    """Rows of the segment that are live in the version and allowed by the filter."""
    mask = id_filter.allows(rows.ids)
    if len(segment.deleted):
        mask &= ~np.isin(rows.ids, segment.deleted)
    return np.flatnonzero(mask)


def exact_top_k(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top k of `vectors` (rows under `ids`) per query: score desc, then id asc."""
    scores = queries @ np.asarray(vectors, dtype=np.float32).T  # (n, m)
    kk = min(k, scores.shape[1])
    if kk < scores.shape[1]:
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        # Ties at the cut: keep every column scoring the k-th best so the id tie-break stays exact.
        cut = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)
        candidates = [np.flatnonzero(row >= c) for row, c in zip(scores, cut[:, 0], strict=True)]
    else:
        candidates = [np.arange(scores.shape[1]) for _ in range(len(scores))]
    out_scores = np.full((len(queries), kk), -np.inf, dtype=np.float32)
    out_ids = np.full((len(queries), kk), MISSING_ID, dtype=np.int64)
    for q, columns in enumerate(candidates):
        order = np.lexsort((ids[columns], -scores[q, columns]))[:kk]
        out_scores[q, : len(order)] = scores[q, columns[order]]
        out_ids[q, : len(order)] = ids[columns[order]]
    return out_scores, out_ids


def index_top_k(
    segment: SearchableSegment, rows: SegmentRows, matching: np.ndarray, queries: np.ndarray, k: int, nprobe: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The segment's index searched with only the matching ids selectable (bitmap over the ids)."""
    selected = rows.ids[matching]
    mask = np.zeros(int(selected.max()) + 1, dtype=bool)
    mask[selected] = True
    bitmap = np.packbits(mask, bitorder="little")
    selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
    params: faiss.SearchParameters
    if nprobe is None:
        params = faiss.SearchParameters()
    else:
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
    params.sel = selector
    scores, ids = segment.index.search(queries, min(k, len(matching)), params=params)
    del bitmap  # kept alive until the search returned
    return scores, ids


def search_filtered(
    segments: Sequence[SearchableSegment],
    rows: Sequence[SegmentRows],
    queries: np.ndarray,
    k: int,
    id_filter: IdFilter,
    exact_max: int = EXACT_SCAN_MAX_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """Top k per query among live ids the filter allows, over all segments (padded with -inf / -1)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if k < 1:
        raise ValueError("k must be >= 1")
    parts = []
    for segment, segment_rows in zip(segments, rows, strict=True):
        matching = matching_rows(segment, segment_rows, id_filter)
        nprobe, nlist = ivf_knobs(segment.index)
        plan = plan_scan(len(matching), len(segment_rows.ids), nprobe, nlist, exact_max)
        if plan.kind == "exact":
            parts.append(exact_top_k(segment_rows.vectors[matching], segment_rows.ids[matching], queries, k))
        elif plan.kind == "index":
            parts.append(index_top_k(segment, segment_rows, matching, queries, k, plan.nprobe))
    return merge_top_k(parts, k, len(queries))


def stored_vectors(
    segments: Sequence[SearchableSegment], rows: Sequence[SegmentRows], ids: np.ndarray, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """(found (n,) bool, vectors (n, dim)) of the live copy of each id in the version (zeros where not found)."""
    ids = np.asarray(ids, dtype=np.int64)
    found = np.zeros(len(ids), dtype=bool)
    vectors = np.zeros((len(ids), dim), dtype=np.float32)
    for segment, segment_rows in zip(segments, rows, strict=True):
        at = segment_rows.rows_of(ids)
        live = (at >= 0) & ~np.isin(ids, segment.deleted) & ~found
        if live.any():
            vectors[live] = segment_rows.vectors[at[live]]
            found |= live
    return found, vectors
