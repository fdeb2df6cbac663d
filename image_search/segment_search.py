"""Exact top-k over a version's segments: each segment searched with its dead ids filtered inside the scan.

A version is several immutable segments plus, per segment, the ids that are dead there (removed, or
edited: the live copy is in a newer segment). Each segment is searched for k with a FAISS
`IDSelectorNot(IDSelectorBatch(dead ids))` in its search parameters, so the scan itself skips dead
vectors and a segment still gives k live results when it has them (a post-filter would return fewer
than k). The per-segment top-k lists are then merged: highest score first, ties broken by the lower
id, so the answer does not depend on segment order. On exact (Flat) segments the result equals one
flat index over the same live vectors. A small Flat segment given an `Fp16Scan` (image_search/fp16_scan.py)
is scanned at half the memory traffic and re-scored exactly: the same answer, sooner. In a version
with an IVF-Flat segment, a segment given `SegmentLists` (image_search/shared_lists.py: the host's
own lists, or a small Flat segment's rows filed under them) scans only the lists the host's
quantizer assigns the query to, once per search: the answer of one IVF index over the live vectors.

Dead rows are skipped by position, not by id. Every segment index is an IDMap2 around an inner index
whose labels are row positions; handed an id selector, the IDMap2 translates every scanned row's
position to its id (`id_map[position]`, a random read of an array of 8 bytes a row) before asking
the selector. At 1M rows that array is 8 MB, out of the cache, and the translation cost a tuned
IVF4096 search ~2 ms on top of its ~2 ms (benchmarks/publish_at_scale.py). So `search_segments`
searches the inner index with a bitmap of live positions (1 bit a row: 125 KB at 1M) and maps
only the k results to ids. `selector` (by id) stays for the other scans (filtered_search.py,
duplicate_pairs.py), which search the IDMap2 itself.

API summary:
- `SearchableSegment(name, index, deleted)`: one loaded segment; `searchable(name, index, deleted_ids,
  fp16_scan=None, lists=None)` builds it (a caller that keeps segments across versions builds the
  `Fp16Scan` and the `SegmentLists` once;
  the id selector is built once per segment and version, the search parameters per call,
  because FAISS's IDMap swaps the selector of the parameters it is given during a search and so a
  parameters object must not be shared by concurrent searches).
- `search_segments(segments, queries, k) -> (scores (n, k) float32, ids (n, k) int64)`, padded with
  score -inf and id -1 where fewer than k live vectors exist.
- `merge_top_k(parts, k)`: the pure merge of per-segment (scores, ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from image_search.fp16_scan import Fp16Scan
from image_search.live_rows import MISSING_ID, LiveRows
from image_search.shared_lists import Coarse, FiledRows, SegmentLists, search_filed


@dataclass(frozen=True)
class SearchableSegment:
    name: str
    index: faiss.Index
    deleted: np.ndarray  # int64, sorted: the ids dead in this segment
    selector: faiss.IDSelector | None  # keeps live ids only; None when nothing is dead here
    live_count: int
    keepalive: tuple[object, ...] = ()  # the C++ selector points into these: they live as long as it
    fp16_scan: Fp16Scan | None = None  # a Flat segment's fp16 copy, scanned first (exact re-score)
    fp16_selector: faiss.IDSelector | None = None  # the dead rows, by position, for that scan
    live_rows: LiveRows | None = None  # the inner index and a bitmap of its live positions (see above)
    lists: SegmentLists | None = None  # scanned through the host's lists (shared_lists.py)

    def search_parameters(self) -> faiss.SearchParameters | None:
        """Fresh parameters for one search call (see the module docstring for why not shared)."""
        if self.selector is None:
            return None
        params: faiss.SearchParameters
        try:
            ivf = faiss.extract_index_ivf(self.index)
        except RuntimeError:  # not IVF: Flat (HNSW is not built by this project)
            params = faiss.SearchParameters()
        else:
            # Parameters replace the index's own knobs for the call: carry its nprobe (the default is 1).
            params = faiss.SearchParametersIVF()
            params.nprobe = int(ivf.nprobe)
        params.sel = self.selector
        return params


def searchable(
    name: str,
    index: faiss.Index,
    deleted_ids: Sequence[int] | np.ndarray,
    fp16_scan: Fp16Scan | None = None,
    lists: SegmentLists | None = None,
) -> SearchableSegment:
    """One segment of a version. `lists` (shared_lists.py) takes precedence over `fp16_scan`."""
    if lists is not None:
        fp16_scan = None
    deleted = np.unique(np.asarray(deleted_ids, dtype=np.int64))
    if not len(deleted):
        return SearchableSegment(name, index, deleted, None, int(index.ntotal), fp16_scan=fp16_scan, lists=lists)
    batch = faiss.IDSelectorBatch(len(deleted), faiss.swig_ptr(deleted))
    selector = faiss.IDSelectorNot(batch)
    fp16_selector, fp16_keepalive = fp16_scan.dead_selector(deleted) if fp16_scan is not None else (None, ())
    return SearchableSegment(
        name,
        index,
        deleted,
        selector,
        int(index.ntotal) - len(deleted),
        (batch, *fp16_keepalive),
        fp16_scan,
        fp16_selector,
        None if fp16_scan is not None else LiveRows.of(index, deleted),
        lists,
    )


def merge_top_k(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-segment (scores (n, k_i), ids (n, k_i)) into the top k per query: score desc, then id asc."""
    if not parts:
        return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), MISSING_ID, dtype=np.int64)
    scores = np.concatenate([p[0] for p in parts], axis=1).astype(np.float32, copy=False)
    ids = np.concatenate([p[1] for p in parts], axis=1).astype(np.int64, copy=False)
    scores = np.where(ids == MISSING_ID, -np.inf, scores).astype(np.float32)
    # lexsort: the last key is the primary one; missing entries (-inf) sort last.
    order = np.lexsort((np.where(ids == MISSING_ID, np.iinfo(np.int64).max, ids), -scores), axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids = np.take_along_axis(ids, order, axis=1)
    if top_scores.shape[1] < k:
        pad = k - top_scores.shape[1]
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=MISSING_ID)
    return top_scores, top_ids


def search_segments(
    segments: Sequence[SearchableSegment], queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top k live vectors over all segments for each query row (inner product on unit vectors)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2:
        raise ValueError("queries must be a (n, dim) matrix")
    if k < 1:
        raise ValueError("k must be >= 1")
    parts = []
    coarse = Coarse()  # the host quantizer's assignment of these queries, computed once
    filed: dict[str, list[tuple[FiledRows, LiveRows | None]]] = {}  # by host: searched as one part
    for segment in segments:
        if segment.live_count <= 0:
            continue
        kk = min(k, segment.live_count)
        if isinstance(segment.lists, FiledRows):
            filed.setdefault(segment.lists.host.name, []).append((segment.lists, segment.live_rows))
            continue
        if segment.lists is not None:
            parts.append(segment.lists.search(queries, kk, segment.live_rows, coarse))
            continue
        params = segment.search_parameters()
        if segment.fp16_scan is not None:
            parts.append(
                segment.fp16_scan.search(segment.index, segment.fp16_selector, params, queries, kk, segment.live_count)
            )
            continue
        if params is None:
            scores, ids = segment.index.search(queries, kk)
        elif segment.live_rows is not None:
            scores, ids = segment.live_rows.search(params, queries, kk)
        else:
            scores, ids = segment.index.search(queries, kk, params=params)
        parts.append((scores, ids))
    parts.extend(search_filed(group, queries, k, coarse) for group in filed.values())
    return merge_top_k(parts, k, len(queries))
