"""Collapsing near-duplicate matches: each kept match lists the ids of the matches that repeat it.

Greedy over candidates best first (the order a search returns): a candidate whose cosine with an
already kept match is at least `threshold` joins the first such match's `duplicates`; otherwise it
is kept as a new group. Groups are formed until `k` are kept, so the answer holds k distinct
groups whenever the candidates hold them; the caller asks the index for more candidates than k
(`candidate_count`) and asks again with more when too few groups came back.

Pure numpy, tested without Ray or FAISS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_DEDUP_COSINE = 0.95  # clip-retrieval collapses at 0.94; re-encodings and small crops of one photo sit above
CANDIDATE_FACTOR = 4  # candidates asked for per wanted group on the first try


@dataclass
class Group:
    """One kept match (its row in the candidates) and the rows that duplicate it."""

    row: int
    duplicates: list[int] = field(default_factory=list)


def candidate_count(k: int, available: int, attempt: int = 0) -> int:
    """How many candidates to fetch for k groups: CANDIDATE_FACTOR * k, doubled on each retry, at most all."""
    return min(available, k * CANDIDATE_FACTOR * (2**attempt))


def collapse(vectors: np.ndarray, k: int, threshold: float) -> list[Group]:
    """Groups of the candidate rows (unit `vectors`, best match first), at most k.

    A candidate joins the best-scoring kept group it is a near-duplicate of. After the k-th group
    the scan goes on only while candidates are duplicates of kept groups; the first distinct one
    ends it.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a cosine in [-1, 1], got {threshold}")
    groups: list[Group] = []
    heads = np.empty((0, vectors.shape[1] if vectors.ndim == 2 else 0), dtype=np.float32)
    for row in range(len(vectors)):
        vector = np.asarray(vectors[row], dtype=np.float32)
        if len(groups):
            similar = np.flatnonzero(heads @ vector >= threshold)
            if len(similar):
                groups[int(similar[0])].duplicates.append(row)
                continue
        if len(groups) == k:
            break
        groups.append(Group(row))
        heads = np.vstack([heads, vector[None, :]])
    return groups


def enough_groups(groups: list[Group], k: int, candidates: int, available: int) -> bool:
    """Whether a collapse answered: k groups, or every vector of the index was a candidate."""
    return len(groups) >= k or candidates >= available
