"""Pairs of near-duplicate live images of a version: a FAISS range search of every live vector.

Each segment's index is range-searched (inner product > radius, dead ids filtered inside the scan
by the segment's selector) with the version's live vectors as queries, in blocks of
`QUERY_BLOCK` rows so memory stays bounded; on Flat segments this is an exact blocked matrix
product, on IVF ones it is as approximate as the segment's search. Each pair is kept once (lower
id first). The work is bounded: at most `MAX_DUPLICATE_PAIRS` pairs and `MAX_DUPLICATE_SECONDS`;
past either, the answer says `complete=False` (the pairs found so far are real pairs).

API: `duplicate_pairs(segments, rows, threshold, ...) -> DuplicatePairs(pairs (m, 2) int64, complete)`.
Sharded Searchers (image_search/shards.py) add the pairs that span two shards: `live_block` hands out
one shard's live vectors a block at a time and `cross_pairs` range-searches them on another shard.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from image_search.filtered_search import SegmentRows
from image_search.segment_search import SearchableSegment

QUERY_BLOCK = 1024  # live vectors range-searched per call
MAX_DUPLICATE_PAIRS = 100_000  # ~1.6 MB of pairs: one gRPC message
MAX_DUPLICATE_SECONDS = 120.0  # one version's scan, once (the caller caches it)


@dataclass(frozen=True)
class DuplicatePairs:
    pairs: np.ndarray  # int64 (m, 2), a < b, sorted
    complete: bool


def live_vectors(segments: Sequence[SearchableSegment], rows: Sequence[SegmentRows]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of every live vector of the version."""
    ids, vectors = [], []
    for segment, segment_rows in zip(segments, rows, strict=True):
        live = ~np.isin(segment_rows.ids, segment.deleted)
        ids.append(segment_rows.ids[live])
        vectors.append(np.asarray(segment_rows.vectors[np.flatnonzero(live)], dtype=np.float32))
    if not ids:
        return np.empty(0, np.int64), np.empty((0, 0), np.float32)
    return np.concatenate(ids), np.concatenate(vectors)


def duplicate_pairs(
    segments: Sequence[SearchableSegment],
    rows: Sequence[SegmentRows],
    threshold: float,
    max_pairs: int = MAX_DUPLICATE_PAIRS,
    max_seconds: float = MAX_DUPLICATE_SECONDS,
) -> DuplicatePairs:
    """Live id pairs with cosine >= threshold (see the module docstring)."""
    started = time.monotonic()
    ids, vectors = live_vectors(segments, rows)
    radius = range_radius(threshold)
    found: list[np.ndarray] = []
    total = 0
    for start in range(0, len(ids), QUERY_BLOCK):
        block_ids = ids[start : start + QUERY_BLOCK]
        block = np.ascontiguousarray(vectors[start : start + QUERY_BLOCK])
        for segment in segments:
            pairs = segment_pairs(segment, block_ids, block, radius, cross=False)
            if len(pairs):
                found.append(pairs)
                total += len(pairs)
            if total >= max_pairs or time.monotonic() - started > max_seconds:
                return DuplicatePairs(_sorted(found)[:max_pairs], complete=False)
    return DuplicatePairs(_sorted(found), complete=True)


def range_radius(threshold: float) -> float:
    """FAISS keeps scores > radius: a hair below the threshold keeps scores equal to it."""
    return float(np.nextafter(np.float32(threshold), np.float32(-2)))


def segment_pairs(
    segment: SearchableSegment, block_ids: np.ndarray, block: np.ndarray, radius: float, cross: bool
) -> np.ndarray:
    """(m, 2) pairs (lower id first) of query rows `block` (under `block_ids`) with the segment's live
    vectors scoring above `radius`. Not `cross`: the queries are the same version's own vectors, so
    each pair is kept once (from its lower id's query) and an image never pairs with itself. `cross`:
    the queries are another shard's vectors (ids disjoint from this segment's live ones), every hit kept."""
    if segment.live_count <= 0 or not len(block_ids):
        return np.empty((0, 2), dtype=np.int64)
    params = segment.search_parameters()
    if params is None:
        lims, _, hits = segment.index.range_search(block, radius)
    else:
        lims, _, hits = segment.index.range_search(block, radius, params=params)
    counts = np.asarray(lims[1:], dtype=np.int64) - np.asarray(lims[:-1], dtype=np.int64)
    firsts = np.repeat(np.asarray(block_ids, dtype=np.int64), counts)
    hits = np.asarray(hits, dtype=np.int64)
    if cross:
        keep = firsts != hits
        return np.stack([np.minimum(firsts, hits)[keep], np.maximum(firsts, hits)[keep]], axis=1)
    keep = firsts < hits  # each pair once, and never an image with itself
    return np.stack([firsts[keep], hits[keep]], axis=1)


def cross_pairs(
    segments: Sequence[SearchableSegment], query_ids: np.ndarray, queries: np.ndarray, threshold: float
) -> np.ndarray:
    """Pairs (lower id first, sorted, unique) of other shards' live vectors `queries` (under `query_ids`)
    with this shard's live vectors at cosine >= threshold: the pairs that span two shards."""
    radius = range_radius(threshold)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    found = [segment_pairs(segment, query_ids, queries, radius, cross=True) for segment in segments]
    return _sorted([pairs for pairs in found if len(pairs)])


def live_block(
    segments: Sequence[SearchableSegment], rows: Sequence[SegmentRows], offset: int, limit: int
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(ids, vectors, next offset or None at the end): the live vectors among stored rows
    [offset, offset + limit) of the segments one after another. Lets another shard range-search a
    shard's vectors a block at a time, without gathering them all (`live_vectors`) per block."""
    ids: list[np.ndarray] = []
    vectors: list[np.ndarray] = []
    start = 0
    end = offset + limit
    for segment, segment_rows in zip(segments, rows, strict=True):
        stop = start + len(segment_rows.ids)
        low, high = max(offset, start), min(end, stop)
        if low < high:
            at = np.arange(low - start, high - start)
            live = at[~np.isin(segment_rows.ids[at], segment.deleted)]
            ids.append(segment_rows.ids[live])
            vectors.append(np.asarray(segment_rows.vectors[live], dtype=np.float32))
        start = stop
    dim = int(rows[0].vectors.shape[1]) if rows and rows[0].vectors.ndim == 2 else 0
    block_ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
    block = np.concatenate(vectors) if vectors else np.empty((0, dim), np.float32)
    return block_ids, block, (end if end < start else None)


def _sorted(found: list[np.ndarray]) -> np.ndarray:
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.unique(np.concatenate(found).astype(np.int64), axis=0)
    return pairs
