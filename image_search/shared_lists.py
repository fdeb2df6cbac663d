"""Small segments searched through the large IVF segment's lists: one coarse assignment per query.

A large collection is one big IVF-Flat segment plus small Flat segments, one per change until the
merge policy compacts them (merge_policy.py). Scanning a small Flat segment reads all of its rows:
at 1M vectors the policy's 6 small segments of 2,000 rows cost ~1.9 ms a query beside the big
segment's ~3.1 ms (benchmarks/publish_at_scale.py, cold caches: each is 4 MB read from memory),
1.6x one segment. Here every small Flat segment is filed under the host's (the largest IVF-Flat
segment's) coarse lists when a Searcher loads it: an in-memory IndexIVFFlat that shares the host's
quantizer, rows labelled by position. A query is assigned to its `nprobe` nearest lists once, with
the host's quantizer and nprobe, and every segment of the version scans only those lists
(`IndexIVF.search_preassigned`): a small segment then costs a few rows, not all of them.

What it answers: exactly what one IVF index over the same live vectors, with the host's centroids
and nprobe, answers (each vector sits in the list its nearest centroid names, wherever it is
stored); tests/test_shared_lists.py checks it against such an index. Collections small enough to be
exact have no IVF segment, so nothing is filed there and their answers stay exact.

Dead rows are skipped inside the scan by position (a bitmap, as segment_search.LiveRows), and only
the k results are mapped to ids. Filing costs one assignment of the segment's rows (~0.1 s for 2,000
rows against 4,096 lists) once per segment and host, not per version.

API: `host_lists(name, index) -> SegmentLists | None` (an IVF-Flat segment: the host's own lists);
`file_under(host, index) -> SegmentLists | None` (a Flat segment filed under the host);
`lists.search(queries, k, selector, coarse)`, `coarse` a dict that carries one search's assignments
from segment to segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

MISSING_ID = -1
Coarse = dict[str, tuple[np.ndarray, np.ndarray]]  # host name -> (centroid scores, list numbers), (n, nprobe)


@dataclass(frozen=True)
class SegmentLists:
    """A segment's rows in an IVF-Flat index over the host's quantizer; labels are row positions."""

    host: str  # the segment whose quantizer and nprobe assign queries (itself, for the host)
    ivf: faiss.IndexIVFFlat
    host_ivf: faiss.IndexIVF  # its quantizer assigns; its nprobe (the Searcher's knob) says how many lists
    row_ids: np.ndarray  # int64: the id of each row position
    keepalive: tuple[object, ...] = ()  # the host index whose quantizer `ivf` points into

    def search(
        self, queries: np.ndarray, k: int, selector: faiss.IDSelector | None, coarse: Coarse
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top k of this segment's live rows (selector: by position) in the query's host lists, as ids."""
        nprobe = min(int(self.host_ivf.nprobe), int(self.host_ivf.nlist))
        if self.host not in coarse:
            coarse[self.host] = self.host_ivf.quantizer.search(queries, nprobe)
        centroid_scores, lists = coarse[self.host]
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        if selector is not None:
            params.sel = selector
        n = len(queries)
        scores = np.empty((n, k), dtype=np.float32)
        positions = np.empty((n, k), dtype=np.int64)
        # The SWIG method: the Python wrapper of search_preassigned refuses search parameters.
        faiss.IndexIVF.search_preassigned_c(  # type: ignore[attr-defined]
            self.ivf,
            n,
            faiss.swig_ptr(queries),
            k,
            faiss.swig_ptr(np.ascontiguousarray(lists, dtype=np.int64)),
            faiss.swig_ptr(np.ascontiguousarray(centroid_scores, dtype=np.float32)),
            faiss.swig_ptr(scores),
            faiss.swig_ptr(positions),
            False,
            params,
        )
        return scores, np.where(positions >= 0, self.row_ids[np.maximum(positions, 0)], MISSING_ID)


def id_mapped_rows(index: faiss.Index) -> tuple[faiss.Index, np.ndarray] | None:
    """The inner index of an IDMap(2) whose inner labels are row positions, and each row's id."""
    outer = faiss.downcast_index(index)
    if not isinstance(outer, faiss.IndexIDMap | faiss.IndexIDMap2):
        return None
    inner = faiss.downcast_index(outer.index)
    row_ids = faiss.vector_to_array(outer.id_map).astype(np.int64, copy=False)
    if int(inner.ntotal) != len(row_ids):
        return None
    return inner, row_ids


def host_lists(name: str, index: faiss.Index) -> SegmentLists | None:
    """An inner-product IVF-Flat segment's own lists (it can host others), or None for any other index."""
    mapped = id_mapped_rows(index)
    if mapped is None:
        return None
    inner, row_ids = mapped
    if not isinstance(inner, faiss.IndexIVFFlat) or inner.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    return SegmentLists(name, inner, inner, row_ids, (index,))


def file_under(host: SegmentLists, index: faiss.Index) -> SegmentLists | None:
    """A Flat inner-product segment's rows filed under `host`'s lists (in memory), or None."""
    mapped = id_mapped_rows(index)
    if mapped is None:
        return None
    flat, row_ids = mapped
    if (
        not isinstance(flat, faiss.IndexFlat)
        or flat.metric_type != faiss.METRIC_INNER_PRODUCT
        or int(flat.d) != int(host.host_ivf.d)
    ):
        return None
    quantizer = host.host_ivf.quantizer
    ivf = faiss.IndexIVFFlat(quantizer, int(flat.d), int(host.host_ivf.nlist), faiss.METRIC_INNER_PRODUCT)
    if len(row_ids):
        ivf.add(flat.reconstruct_n(0, len(row_ids)))
    return SegmentLists(host.host, ivf, host.host_ivf, row_ids, (*host.keepalive, quantizer))


def largest_host(candidates: Sequence[tuple[SegmentLists | None, int]]) -> SegmentLists | None:
    """The host of a version: of its IVF-Flat segments' lists (with their live counts), the largest's."""
    hosts = [(live, lists) for lists, live in candidates if lists is not None and lists.host_ivf is lists.ivf]
    return max(hosts, key=lambda pair: pair[0])[1] if hosts else None
