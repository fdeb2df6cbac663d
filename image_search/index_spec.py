"""Which FAISS index a collection gets: a pure function of its size, as an `index_factory` string.

Below `EXACT_SEARCH_LIMIT` vectors an exact flat scan answers a query in well under 10 ms on one
core (100k x 512 floats is ~200 MB and ~50M multiply-adds), needs no training and has perfect
recall, so approximate indexes buy nothing. Above it, IVF with a flat (uncompressed) coarse
quantiser keeps recall@5 >= 0.95 at nprobe 32 on CLIP-like clustered data while scanning
~1-2% of the vectors (see benchmarks/search_at_scale.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

EXACT_SEARCH_LIMIT = 100_000
DEFAULT_NPROBE = 32
# k-means wants >= ~39 training points per centroid; FAISS warns below that. More buys little:
# centroids from 64 per list gave recall@5 1.0 at 1M vectors (benchmarks/search_at_scale.py)
# while FAISS's own default (up to 256 per list) takes ~4x longer to train.
TRAINING_POINTS_PER_LIST = 64


@dataclass(frozen=True)
class IndexSpec:
    factory: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"factory": self.factory, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        return cls(factory=str(data["factory"]), params=dict(data.get("params", {})))

    def training_rows(self, count: int) -> int:
        """How many of `count` vectors k-means trains on: all of them for small collections."""
        match = re.match(r"IVF(\d+)", self.factory)
        if match is None:
            return 0
        return min(count, TRAINING_POINTS_PER_LIST * int(match.group(1)))


def ivf_list_count(count: int) -> int:
    """About 4*sqrt(n) inverted lists, rounded to a power of two, capped so training has data."""
    target = 4 * math.sqrt(count)
    lists = 2 ** round(math.log2(max(target, 1)))
    return int(max(16, min(lists, 65536, count // TRAINING_POINTS_PER_LIST)))


def choose_index_spec(count: int, dim: int) -> IndexSpec:
    if count <= 0:
        raise ValueError("an index needs at least one vector")
    if count <= EXACT_SEARCH_LIMIT:
        return IndexSpec("Flat")
    lists = ivf_list_count(count)
    return IndexSpec(f"IVF{lists},Flat", {"nprobe": DEFAULT_NPROBE})
