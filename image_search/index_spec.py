"""The FAISS index a collection (or a segment) gets, as a recorded `index_factory` string and knobs.

`choose_index_spec` is the entry point the builder calls; the choice itself (by vector count, dim,
memory budget and recall target) is image_search/index_planner.py, a pure function with the memory
formulas and the reasons. After the build, image_search/recall_tuning.py replaces the starting
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
    ivf_list_count,
    plan_index,
)

__all__ = [
    "DEFAULT_MAX_INDEX_MEMORY",
    "DEFAULT_NPROBE",
    "DEFAULT_RECALL_TARGET",
    "EXACT_SEARCH_LIMIT",
    "TRAINING_POINTS_PER_LIST",
    "IndexDoesNotFit",
    "IndexSpec",
    "choose_index_spec",
    "ivf_list_count",
]


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
) -> IndexSpec:
    """The planner's index for `count` x `dim` vectors, with its starting search knobs and reason.

    Raises `IndexDoesNotFit` (a ValueError) when no index type holds them in `max_memory_bytes`.
    """
    plan = plan_index(
        count, dim, max_memory_bytes, recall_target, mappable=mappable, idmap_bytes_per_vector=idmap_bytes_per_vector
    )
    return IndexSpec(plan.factory, plan.initial_params(), reason=plan.reason)
