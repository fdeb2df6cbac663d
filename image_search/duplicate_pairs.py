"""Pairs of near-duplicate live images of a version: a FAISS range search of every live vector.

Up to `EXACT_PAIRS_MAX_ROWS` live vectors, each segment's index is range-searched (inner product >
radius, dead ids filtered inside the scan by the segment's selector) with the version's live
vectors as queries, in blocks of `QUERY_BLOCK` rows so memory stays bounded; on Flat segments this
is an exact blocked matrix product, on IVF ones it is as approximate as the segment's search.

Above that, an all-pairs scan grows with the square of the collection (100k x 512 is 5.1 T
multiply-adds: minutes on two cores), so the range search runs on one temporary coarse index over
the live vectors instead: IVF with `COARSE_LISTS_PER_SQRT_ROW * sqrt(n)` lists of 8-bit codes,
each vector probing its `COARSE_NPROBE` nearest lists. Near-duplicates (cosine >= 0.8, the lowest
threshold GET /duplicates takes) lie next to each other, so they share a list or a neighbouring
one: the scan does ~nlist / nprobe times less work, and misses only pairs split across lists that
neither member probes (benchmarks/duplicates.py measures the share against brute force). The
8-bit scores only nominate candidates (scores above the threshold minus `CANDIDATE_MARGIN`,
wider than the codes' error); every pair returned is checked on the stored vectors, so it is a
real pair at the threshold, and each pair is searched from both members.

Each pair is kept once (lower id first). The work is bounded: at most `MAX_DUPLICATE_PAIRS` pairs
and `MAX_DUPLICATE_SECONDS`; past either, the answer says `complete=False` (the pairs found so far
are real pairs).

API: `duplicate_pairs(segments, rows, threshold, ...) -> DuplicatePairs(pairs (m, 2) int64, complete)`.
Sharded Searchers (image_search/shards.py) add the pairs that span two shards: `live_block` hands out
one shard's live vectors a block at a time and `cross_pairs` range-searches them on another shard.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from image_search.filtered_search import SegmentRows
from image_search.segment_search import SearchableSegment

QUERY_BLOCK = 1024  # live vectors range-searched per call
MAX_DUPLICATE_PAIRS = 100_000  # ~1.6 MB of pairs: one gRPC message
MAX_DUPLICATE_SECONDS = 120.0  # one version's scan, once (the caller caches it)
EXACT_PAIRS_MAX_ROWS = 20_000  # all pairs by the segments' own indexes: ~2 s of two cores at 512 dims
COARSE_LISTS_PER_SQRT_ROW = 2  # nlist = 2 sqrt(n): lists of ~sqrt(n) / 2 vectors
COARSE_NPROBE = 4  # lists each vector probes
COARSE_TRAIN_ROWS_PER_LIST = 64  # k-means sample a list
COARSE_MIN_TRAIN_ROWS_PER_LIST = 39  # FAISS's minimum (it warns below): caps nlist for small n
CANDIDATE_MARGIN = 0.02  # below the threshold, on 8-bit scores (their error on unit vectors: < 0.005)


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
    exact_max_rows: int = EXACT_PAIRS_MAX_ROWS,
) -> DuplicatePairs:
    """Live id pairs with cosine >= threshold (see the module docstring); above `exact_max_rows` live
    vectors, through the coarse index."""
    started = time.monotonic()
    ids, vectors = live_vectors(segments, rows)
    if len(ids) > exact_max_rows:
        return coarse_pairs(ids, vectors, threshold, max_pairs, max_seconds, started)
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


def coarse_pairs(
    ids: np.ndarray, vectors: np.ndarray, threshold: float, max_pairs: int, max_seconds: float, started: float
) -> DuplicatePairs:
    """Live id pairs with cosine >= threshold, found through one coarse IVF over `vectors` (see the
    module docstring); `started` is the time.monotonic() the bound counts from."""
    index = coarse_index(vectors)
    radius = range_radius(threshold - CANDIDATE_MARGIN)
    at_least = np.float32(threshold)
    found: list[np.ndarray] = []
    total = 0
    for start in range(0, len(ids), QUERY_BLOCK):
        block = np.ascontiguousarray(vectors[start : start + QUERY_BLOCK])
        lims, _, hits = index.range_search(block, radius)
        counts = np.asarray(lims[1:], dtype=np.int64) - np.asarray(lims[:-1], dtype=np.int64)
        firsts = np.repeat(np.arange(start, start + len(block), dtype=np.int64), counts)
        hits = np.asarray(hits, dtype=np.int64)
        keep = firsts != hits  # never an image with itself
        firsts, hits = firsts[keep], hits[keep]
        exact = np.einsum("ij,ij->i", vectors[firsts], vectors[hits])  # the stored vectors decide
        real = exact >= at_least
        a, b = ids[firsts[real]], ids[hits[real]]
        if len(a):
            found.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
            total += len(a)  # counts each pair up to twice (once from each member): stops early, never late
        if total >= 2 * max_pairs or time.monotonic() - started > max_seconds:
            pairs = _sorted(found)
            return DuplicatePairs(pairs[:max_pairs], complete=False)
    pairs = _sorted(found)
    if len(pairs) > max_pairs:
        return DuplicatePairs(pairs[:max_pairs], complete=False)
    return DuplicatePairs(pairs, complete=True)


def coarse_index(vectors: np.ndarray) -> faiss.Index:
    """A temporary IVF of 8-bit codes over `vectors` (row positions as ids), probing COARSE_NPROBE lists."""
    n, dim = vectors.shape
    nlist = max(1, min(int(COARSE_LISTS_PER_SQRT_ROW * np.sqrt(n)), n // COARSE_MIN_TRAIN_ROWS_PER_LIST))
    index = faiss.index_factory(dim, f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
    sample = min(n, COARSE_TRAIN_ROWS_PER_LIST * nlist)
    rows = np.sort(np.random.default_rng(0).choice(n, size=sample, replace=False))
    index.train(np.ascontiguousarray(vectors[rows]))
    index.add(np.ascontiguousarray(vectors))
    faiss.extract_index_ivf(index).nprobe = min(COARSE_NPROBE, nlist)
    return index


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
