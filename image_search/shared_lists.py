"""Small segments searched through the large IVF segment's lists: one coarse assignment per query.

A large collection is one big IVF-Flat segment plus small Flat segments, one per change until the
merge policy compacts them (merge_policy.py). Scanning a small Flat segment reads all of its rows:
at 1M vectors the policy's 6 small segments of 2,000 rows cost ~1.9 ms a query beside the big
segment's ~3.1 ms (benchmarks/publish_at_scale.py, cold caches: each is 4 MB read from memory),
1.6x one segment. So when a Searcher loads a small Flat segment of a version that has an IVF-Flat
segment (the host: the largest), it files each row under the host's list for it (its nearest
centroid, as the host's own `add` did for its rows). A query is assigned to its `nprobe` nearest
lists once, with the host's quantizer and nprobe; the host scans those lists
(`IndexIVF.search_preassigned`) and each filed segment scores only its rows in them.

Why not an IVF index per small segment over the host's quantizer: FAISS visits each probed list of
each segment, ~0.5 us a list even when it holds one row, so a filed segment cost nprobe x 0.5 us
(0.14 ms at nprobe 256), and a stack of the small segments' lists (HStackInvertedLists) copies
each probed list per query and was slower still (measured: 6 segments of 2,000 rows, 2,048 lists,
nprobe 256: 0.83 and 1.17 ms). Scoring a filed segment's rows of the probed lists in numpy is one
gather over the segment's row-list numbers and a product over the few rows found.

What it answers: exactly what one IVF index over the same live vectors, with the host's centroids
and nprobe, answers (each vector sits in the list its nearest centroid names, wherever it is
stored); tests/test_shared_lists.py checks it against such an index. Collections small enough to be
exact have no IVF segment, so nothing is filed there and their answers stay exact. Filing costs one
assignment of the segment's rows (~0.1 s for 2,000 rows against 4,096 lists), once per segment and
host, not per version. Dead rows are skipped by position (live_rows.py) in both kinds.

API: `host_lists(name, index) -> HostLists | None` (an IVF-Flat segment's own lists);
`file_under(host, index) -> FiledRows | None` (a Flat segment's rows filed under the host's);
`largest_host([(lists, live count)])`; `host.search(queries, k, live_rows, coarse)` and
`search_filed([(filed, live_rows)], queries, k, coarse)` (all of a version's filed segments as one
part), `coarse` a `Coarse` that carries one search's assignment from segment to segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np

from image_search.live_rows import MISSING_ID, LiveRows, id_mapped_rows


@dataclass
class Coarse:
    """One search's assignment of its queries to the host's lists, computed by the first segment asking."""

    by_host: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    probed_by_host: dict[str, np.ndarray] = field(default_factory=dict)

    def of(self, host: HostLists, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(centroid scores (n, nprobe), list numbers (n, nprobe)) of the queries for `host`."""
        if host.name not in self.by_host:
            self.by_host[host.name] = host.ivf.quantizer.search(queries, host.nprobe)
        return self.by_host[host.name]

    def probed(self, host: HostLists, queries: np.ndarray) -> np.ndarray:
        """(n, nlist) bool: whether each query probes each list (only the filed segments need it)."""
        if host.name not in self.probed_by_host:
            _, lists = self.of(host, queries)
            probed = np.zeros((len(queries), host.nlist), dtype=bool)
            rows, columns = np.nonzero(lists >= 0)  # FAISS pads with -1 where it found fewer lists
            probed[rows, lists[rows, columns]] = True
            self.probed_by_host[host.name] = probed
        return self.probed_by_host[host.name]


@dataclass(frozen=True)
class HostLists:
    """An IVF-Flat segment's own lists: its quantizer assigns the queries of every segment it hosts."""

    name: str
    ivf: faiss.IndexIVFFlat  # the segment's inner index: labels are row positions
    row_ids: np.ndarray  # int64: the id of each row position
    keepalive: faiss.Index  # the segment index `ivf` belongs to

    @property
    def nlist(self) -> int:
        return int(self.ivf.nlist)

    @property
    def nprobe(self) -> int:  # the Searcher's knob, set on the loaded index
        return min(int(self.ivf.nprobe), self.nlist)

    def search(
        self, queries: np.ndarray, k: int, live_rows: LiveRows | None, coarse: Coarse
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top k of the host's live rows in the queries' lists, as ids: what `search` answers."""
        centroid_scores, lists = coarse.of(self, queries)
        params = faiss.SearchParametersIVF()
        params.nprobe = self.nprobe
        if live_rows is not None:
            params.sel = live_rows.selector
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


@dataclass(frozen=True)
class FiledRows:
    """A Flat segment's rows, each filed under the host list its vector falls in."""

    host: HostLists
    row_lists: np.ndarray  # int32: the host list of each row position
    vectors: np.ndarray  # float32 (rows, dim): a view of the Flat index's own vectors
    row_ids: np.ndarray  # int64: the id of each row position
    keepalive: faiss.Index  # the Flat index whose memory `vectors` views


def search_filed(
    filed: Sequence[tuple[FiledRows, LiveRows | None]], queries: np.ndarray, k: int, coarse: Coarse
) -> tuple[np.ndarray, np.ndarray]:
    """Top k over several segments filed under one host, as one part (one top-k, not one per segment:
    a search_segments part costs its merge, and each filed segment finds only a few rows)."""
    (host,) = {id(segment.host): segment.host for segment, _ in filed}.values()
    probed = coarse.probed(host, queries)
    n = len(queries)
    out_scores = np.full((n, k), -np.inf, dtype=np.float32)
    out_ids = np.full((n, k), MISSING_ID, dtype=np.int64)
    for row in range(n):
        scores, ids = [], []
        for segment, live_rows in filed:
            found = probed[row][segment.row_lists]
            if live_rows is not None:
                found &= live_rows.live
            candidates = np.flatnonzero(found)
            if len(candidates):
                scores.append(segment.vectors[candidates] @ queries[row])
                ids.append(segment.row_ids[candidates])
        if not ids:
            continue
        all_scores = np.concatenate(scores).astype(np.float32, copy=False)
        all_ids = np.concatenate(ids)
        order = np.lexsort((all_ids, -all_scores))[:k]
        out_scores[row, : len(order)] = all_scores[order]
        out_ids[row, : len(order)] = all_ids[order]
    return out_scores, out_ids


def host_lists(name: str, index: faiss.Index) -> HostLists | None:
    """An inner-product IVF-Flat segment's own lists (it can host others), or None for any other index."""
    mapped = id_mapped_rows(index)
    if mapped is None:
        return None
    inner, row_ids = mapped
    if not isinstance(inner, faiss.IndexIVFFlat) or inner.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    return HostLists(name, inner, row_ids, index)


def file_under(host: HostLists, index: faiss.Index) -> FiledRows | None:
    """A Flat inner-product segment's rows filed under `host`'s lists, or None for any other index."""
    mapped = id_mapped_rows(index)
    if mapped is None:
        return None
    flat, row_ids = mapped
    if (
        not isinstance(flat, faiss.IndexFlat)
        or flat.metric_type != faiss.METRIC_INNER_PRODUCT
        or int(flat.d) != int(host.ivf.d)
    ):
        return None
    rows, dim = len(row_ids), int(flat.d)
    vectors = faiss.rev_swig_ptr(flat.get_xb(), rows * dim).reshape(rows, dim) if rows else np.zeros((0, dim))
    # The nearest centroid of each row: the list the host's own `add` would have put it in.
    _, nearest = host.ivf.quantizer.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    return FiledRows(host, nearest[:, 0].astype(np.int32), vectors, row_ids, index)


SegmentLists = HostLists | FiledRows


def largest_host(candidates: Sequence[tuple[HostLists | None, int]]) -> HostLists | None:
    """The host of a version: of its IVF-Flat segments' lists (with their live counts), the largest's."""
    hosts = [(live, lists) for lists, live in candidates if lists is not None]
    return max(hosts, key=lambda pair: pair[0])[1] if hosts else None
