"""The FAISS index a collection (or a segment) gets, as a recorded `index_factory` string and knobs.

`choose_index_spec` plans one index for a whole collection; `choose_segment_index_spec` plans one
segment of a version (what the builder, compaction and writes call). The choice itself (by vector
count, dim, memory budget and recall target) is image_search/index_planner.py, a pure function with
the memory formulas and the reasons.

Why a segment is planned with its collection's size: a search scans every segment, so a version
costs the sum of its segments. An exact Flat segment costs its whole size per query; an IVF one
about nlist + nprobe * size / nlist (~1/6 of its size at 20k-50k vectors on CLIP-like data, tuned
to recall@10 0.95). In a collection small enough to be exact (at most `EXACT_SEARCH_LIMIT` live
vectors) every segment stays Flat, so answers equal one exact index's. In a larger one the big
segments are IVF and answers approximate anyway; there a merged segment of 90k vectors left Flat
would cost more than the 1M-vector IVF segment beside it. So from `MIN_IVF_SEGMENT` vectors on
(the merge policy's first tier above the floor: 10 x 1,000) a segment of a large collection gets
IVF with its nprobe tuned on its own vectors; smaller ones (one change, a few changes) stay Flat,
cheap to write and to scan. After the build, image_search/recall_tuning.py replaces the starting
`nprobe` / `ef_search` with the smallest value that meets the recall target on the collection itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from image_search.index_planner import (
    DEFAULT_MAX_INDEX_MEMORY,
    DEFAULT_NPROBE,
    DEFAULT_RECALL_TARGET,
    EXACT_SEARCH_LIMIT,
    IDMAP2_BYTES_PER_VECTOR,
    PQ_MIN_TRAINING_POINTS,
    TRAINING_POINTS_PER_LIST,
    IndexDoesNotFit,
    index_memory_bytes,
    ivf_list_count,
    plan_index,
)

__all__ = [
    "DEFAULT_MAX_INDEX_MEMORY",
    "DEFAULT_NPROBE",
    "DEFAULT_RECALL_TARGET",
    "EXACT_SEARCH_LIMIT",
    "MIN_IVF_SEGMENT",
    "TRAINING_POINTS_PER_LIST",
    "IndexDoesNotFit",
    "IndexSpec",
    "choose_index_spec",
    "choose_segment_index_spec",
    "ivf_list_count",
    "merged_segment_spec",
]


# A segment of a collection over EXACT_SEARCH_LIMIT gets IVF from this size on (module docstring).
MIN_IVF_SEGMENT = 10_000


@dataclass(frozen=True)
class IndexSpec:
    factory: str
    params: dict[str, Any] = field(default_factory=dict)
    # Why the planner chose it (for logs, the version file and /info); not part of the index's identity.
    reason: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"factory": self.factory, "params": dict(self.params)}
        if self.reason:
            data["reason"] = self.reason
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        return cls(
            factory=str(data["factory"]), params=dict(data.get("params", {})), reason=str(data.get("reason", ""))
        )

    def training_rows(self, count: int) -> int:
        """How many of `count` vectors training uses: all of them for small collections, none for Flat/HNSW."""
        match = re.search(r"IVF(\d+)", self.factory)
        if match is None:
            return 0
        rows = TRAINING_POINTS_PER_LIST * int(match.group(1))
        if "PQ" in self.factory:  # each 256-centroid sub-quantiser wants its own ~10k points
            rows = max(rows, PQ_MIN_TRAINING_POINTS)
        return min(count, rows)


def choose_index_spec(
    count: int,
    dim: int,
    *,
    max_memory_bytes: int = DEFAULT_MAX_INDEX_MEMORY,
    recall_target: float = DEFAULT_RECALL_TARGET,
    mappable: bool = True,
    idmap_bytes_per_vector: int = IDMAP2_BYTES_PER_VECTOR,
    exact_limit: int = EXACT_SEARCH_LIMIT,
) -> IndexSpec:
    """The planner's index for `count` x `dim` vectors, with its starting search knobs and reason.

    Raises `IndexDoesNotFit` (a ValueError) when no index type holds them in `max_memory_bytes`.
    """
    plan = plan_index(
        count,
        dim,
        max_memory_bytes,
        recall_target,
        mappable=mappable,
        idmap_bytes_per_vector=idmap_bytes_per_vector,
        exact_limit=exact_limit,
    )
    return IndexSpec(plan.factory, plan.initial_params(), reason=plan.reason)


def choose_segment_index_spec(count: int, collection_count: int, dim: int, **options: Any) -> IndexSpec:
    """The index of one segment of `count` vectors in a version of `collection_count` live vectors.

    Exact (Flat) wherever the collection is at most EXACT_SEARCH_LIMIT; in a larger collection, IVF
    from MIN_IVF_SEGMENT vectors on (see the module docstring). `options`: as choose_index_spec.
    """
    if collection_count > EXACT_SEARCH_LIMIT:
        options.setdefault("exact_limit", MIN_IVF_SEGMENT - 1)
    return choose_index_spec(count, dim, **options)


def merged_segment_spec(
    planned: IndexSpec, largest: IndexSpec, largest_live: int, merged_count: int, dim: int, max_memory_bytes: int
) -> IndexSpec:
    """The index of a merge result: the largest merged segment's own IVF spec when the merge at most
    doubles it and that spec still fits the budget, else `planned` (the planner's choice for its size).

    Why: the planner's list count steps by powers of two at fixed sizes (4096 lists up to 1M, 8192 with
    an HNSW quantiser above), so a 1M segment merged with one change of 900 vectors would be planned
    anew and pay a fresh k-means of twice the lists. Measured at 1M (benchmarks/publish_at_scale.py):
    that compaction took 627 s, 1.3x the whole rebuild. Within 2x of its size the largest segment's
    lists are still within FAISS's guideline (4 sqrt(N) = 5,657 at 2M for 4,096), and its centroids,
    trained on most of the same vectors, are reused (no k-means at all: index_builder/build.py).
    """
    same_family = largest.factory.startswith("IVF") and planned.factory.startswith("IVF")
    if not same_family or 2 * largest_live < merged_count or largest.factory == planned.factory:
        return planned
    if index_memory_bytes(largest.factory, merged_count, dim) > max_memory_bytes:
        return planned
    reason = (
        f"kept the largest merged segment's {largest.factory} ({largest_live} of {merged_count} vectors, "
        f"within the budget) instead of planning {planned.factory}: its centroids are reused"
    )
    return IndexSpec(largest.factory, dict(largest.params), reason=reason)
