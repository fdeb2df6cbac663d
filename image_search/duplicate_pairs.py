"""Pairs of near-duplicate live images of a version: a FAISS range search of every live vector.

Each segment's index is range-searched (inner product > radius, dead ids filtered inside the scan
by the segment's selector) with the version's live vectors as queries, in blocks of
`QUERY_BLOCK` rows so memory stays bounded; on Flat segments this is an exact blocked matrix
product, on IVF ones it is as approximate as the segment's search. Each pair is kept once (lower
id first). The work is bounded: at most `MAX_DUPLICATE_PAIRS` pairs and `MAX_DUPLICATE_SECONDS`;
past either, the answer says `complete=False` (the pairs found so far are real pairs).

API: `duplicate_pairs(segments, rows, threshold, ...) -> DuplicatePairs(pairs (m, 2) int64, complete)`.
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
    # FAISS keeps scores > radius: a hair below the threshold keeps scores equal to it.
    radius = float(np.nextafter(np.float32(threshold), np.float32(-2)))
    found: list[np.ndarray] = []
    total = 0
    for start in range(0, len(ids), QUERY_BLOCK):
        block_ids = ids[start : start + QUERY_BLOCK]
        block = np.ascontiguousarray(vectors[start : start + QUERY_BLOCK])
        for segment in segments:
            if segment.live_count <= 0:
                continue
            params = segment.search_parameters()
            if params is None:
                lims, _, hits = segment.index.range_search(block, radius)
            else:
                lims, _, hits = segment.index.range_search(block, radius, params=params)
            counts = np.asarray(lims[1:], dtype=np.int64) - np.asarray(lims[:-1], dtype=np.int64)
            firsts = np.repeat(block_ids, counts)
            keep = firsts < hits  # each pair once, and never an image with itself
            if keep.any():
                pairs = np.stack([firsts[keep], hits[keep]], axis=1)
                found.append(pairs)
                total += len(pairs)
            if total >= max_pairs or time.monotonic() - started > max_seconds:
                return DuplicatePairs(_sorted(found)[:max_pairs], complete=False)
    return DuplicatePairs(_sorted(found), complete=True)


def _sorted(found: list[np.ndarray]) -> np.ndarray:
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.unique(np.concatenate(found).astype(np.int64), axis=0)
    return pairs
