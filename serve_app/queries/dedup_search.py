"""A de-duplicated search for one query: candidates, collapsed, fetched again with more until k groups.

The Searcher runs it next to the index, so candidates' vectors never cross to the Ingress: only
the k kept matches and their duplicates' ids come back. Each try asks the index for
`candidate_count(k, available, attempt)` candidates (4k, then 8k, ...), collapses them
(serve_app/queries/dedup.py) and stops when k groups formed, when every allowed vector was a
candidate, or at `MAX_DEDUP_CANDIDATES` (a bound on time and memory: past it, fewer than k groups
may come back).

No Ray and no FAISS: the search and the vector lookup arrive as callables, and the loop itself
(`dedup_steps`) is a generator of requests that a synchronous or an asynchronous driver answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from serve_app.queries.dedup import Group, candidate_count, collapse, enough_groups

MAX_DEDUP_CANDIDATES = 4096  # candidates one de-duplicated query may score and collapse


@dataclass(frozen=True)
class DedupRow:
    """One query's answer: the kept matches (best first) and, per kept match, its duplicates' ids."""

    scores: np.ndarray  # float32 (g,)
    ids: np.ndarray  # int64 (g,)
    duplicates: list[list[int]]


# What the steps ask their driver for: ("search", n) -> (scores (1, n), ids (1, n)), or
# ("vectors", ids) -> (len(ids), dim). The drivers below only answer; the steps alone decide.
Request = tuple[str, Any]


def dedup_steps(
    k: int, available: int, threshold: float, max_candidates: int = MAX_DEDUP_CANDIDATES
) -> Generator[Request, Any, DedupRow]:
    """The de-duplicated search as a generator of requests: one definition of the loop for the
    Searcher's synchronous driver and the Ingress's asynchronous one (sharded Searchers)."""
    limit = max(1, min(available, max_candidates))
    attempt = 0
    while True:
        wanted = max(1, min(limit, candidate_count(k, available, attempt)))
        scores, ids = yield ("search", wanted)
        keep = ids[0] >= 0
        row_scores, row_ids = scores[0][keep], ids[0][keep]
        groups = collapse((yield ("vectors", row_ids)), k, threshold)
        if enough_groups(groups, k, wanted, available) or wanted >= limit:
            return _row(row_scores, row_ids, groups)
        attempt += 1


def dedup_search(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    vectors_of: Callable[[np.ndarray], np.ndarray],
    query: np.ndarray,
    k: int,
    available: int,
    threshold: float,
    max_candidates: int = MAX_DEDUP_CANDIDATES,
) -> DedupRow:
    """`search(query (1, dim), n) -> (scores (1, n), ids (1, n))`; `vectors_of(ids) -> (len, dim)`."""
    steps = dedup_steps(k, available, threshold, max_candidates)
    try:
        kind, argument = next(steps)
        while True:
            answer = search(query, argument) if kind == "search" else vectors_of(argument)
            kind, argument = steps.send(answer)
    except StopIteration as done:
        return done.value


async def dedup_search_async(
    search: Callable[[np.ndarray, int], Awaitable[tuple[np.ndarray, np.ndarray]]],
    vectors_of: Callable[[np.ndarray], Awaitable[np.ndarray]],
    query: np.ndarray,
    k: int,
    available: int,
    threshold: float,
    max_candidates: int = MAX_DEDUP_CANDIDATES,
) -> DedupRow:
    """`dedup_search` with awaitable callables: the Ingress's over sharded Searchers (each shard holds
    only some candidates, so the collapse runs where all of them meet). The same steps, the same answer."""
    steps = dedup_steps(k, available, threshold, max_candidates)
    try:
        kind, argument = next(steps)
        while True:
            answer = await (search(query, argument) if kind == "search" else vectors_of(argument))
            kind, argument = steps.send(answer)
    except StopIteration as done:
        return done.value


def _row(row_scores: np.ndarray, row_ids: np.ndarray, groups: list[Group]) -> DedupRow:
    return DedupRow(
        np.asarray([row_scores[g.row] for g in groups], dtype=np.float32),
        np.asarray([row_ids[g.row] for g in groups], dtype=np.int64),
        [[int(row_ids[d]) for d in g.duplicates] for g in groups],
    )
