"""The Ingress's one way into the Searchers: a single deployment, or N shards asked together and merged.

With `searcher.shards: 1` (the default) every call goes to the one `Searcher` deployment exactly as
it always did. With N shards each `Searcher_i` deployment holds only its share of a version's
segments (image_search/shards.py), and every call here asks all shards for the same version and
merges their answers into what one Searcher over all segments would have answered:

- search: each shard's top-k merged by `merge_top_k` (image_search/segment_search.py), the very merge
  one Searcher uses across its segments: score first, ties broken by the lower id;
- dedup: the candidate search and the collapse run here (serve_app/queries/dedup_search.py), over the
  merged candidates, since near-duplicates may sit on two shards;
- stored vectors: each id's vector from the shard that holds it;
- duplicate pairs: each shard's own pairs, plus the pairs that span two shards (shard i's live
  vectors, a block at a time, range-searched on every shard after it);
- prepare: every shard loads the version before the Ingress switches to it (serve_app/served_index.py),
  and every search names the version the request leased, so no answer mixes versions.

Each shard's answer is awaited at most `shard_timeout_s` (retries on another replica of that shard
included). A shard that does not answer in time (or has no replica up) makes the call fail with 503
`shard_unavailable`, unless `allow_partial`: then the others' merged answer comes back with the
missing shards listed (`Answer.missing`; the routes add `"partial": true`). Loading a version and
/duplicates always need every shard (an index is never switched or scanned half-loaded).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
from ray.serve.handle import DeploymentHandle

from image_search.duplicate_pairs import MAX_DUPLICATE_PAIRS, MAX_DUPLICATE_SECONDS, QUERY_BLOCK, DuplicatePairs
from image_search.errors import Overloaded, Unavailable
from image_search.filtered_search import IdFilter
from image_search.segment_search import merge_top_k
from serve_app.config import SearcherOptions
from serve_app.downstream import downstream, retried
from serve_app.queries.dedup_search import DedupRow, dedup_search_async

logger = logging.getLogger("ray.serve")

T = TypeVar("T")
SEARCH_ATTEMPTS = 3  # a call whose replica died is sent again (reads only), to another replica
# Bytes of vectors one shard sends back per stored_vectors call: well inside Serve's 4 MiB gRPC messages.
STORED_VECTORS_BYTES = 2 * 1024 * 1024


class ShardUnavailable(Unavailable):
    """A shard did not answer within shard_timeout_s (or has no replica up), and partial answers are off."""

    code = "shard_unavailable"


@dataclass(frozen=True)
class Answer(Generic[T]):
    value: T
    missing: tuple[int, ...] = ()  # shards that did not answer (only with allow_partial)


def partial_fields(missing: Sequence[int]) -> dict[str, Any]:
    """What an answer adds when shards were missing: nothing when none were (the usual shape)."""
    return {"partial": True, "missing_shards": sorted(set(missing))} if missing else {}


def merge_shard_results(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The shards' (scores, ids) merged into the top k per query (the one-Searcher ranking)."""
    return merge_top_k(parts, k, n)


def merge_stored_vectors(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], n: int, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """(found, vectors) of each shard -> one: an id's vector from the shard that found it."""
    found = np.zeros(n, dtype=bool)
    vectors = np.zeros((n, dim), dtype=np.float32)
    for shard_found, shard_vectors in parts:
        take = np.asarray(shard_found, dtype=bool) & ~found
        vectors[take] = np.asarray(shard_vectors)[take]
        found |= take
    return found, vectors


def merge_pairs(parts: Sequence[np.ndarray], max_pairs: int = MAX_DUPLICATE_PAIRS) -> tuple[np.ndarray, bool]:
    """Pair lists (lower id first) -> one sorted unique list, at most max_pairs (False when cut)."""
    nonempty = [np.asarray(p, dtype=np.int64).reshape(-1, 2) for p in parts if len(p)]
    if not nonempty:
        return np.empty((0, 2), dtype=np.int64), True
    pairs = np.unique(np.concatenate(nonempty), axis=0)
    return pairs[:max_pairs], len(pairs) <= max_pairs


def result_width(k: int, live_count: int) -> int:
    """Columns one Searcher answers with: k, or every live vector when fewer (at least 1)."""
    return max(1, min(k, live_count))


class ShardedSearcher:
    """The Searcher calls of the Ingress (see the module docstring). `handles[i]` is shard i."""

    def __init__(self, handles: Sequence[DeploymentHandle], options: SearcherOptions, dim: int) -> None:
        if len(handles) != options.shards:
            raise ValueError(f"{len(handles)} Searcher handles for {options.shards} shards")
        # Calls go over Serve's inter-deployment gRPC (see the Ingress), messages capped at 4 MiB.
        self.handles = [handle.options(_by_reference=False) for handle in handles]
        self.timeout_s = options.shard_timeout_s
        self.allow_partial = options.allow_partial
        self.dim = dim

    @property
    def shards(self) -> int:
        return len(self.handles)

    async def _one(self, call: Callable[[DeploymentHandle], Any]) -> Any:
        return await retried(lambda: call(self.handles[0]), SEARCH_ATTEMPTS, "Searcher")

    async def _all(
        self, call: Callable[[DeploymentHandle], Any], partial: bool, deadline: bool = True
    ) -> tuple[list[Any], tuple[int, ...]]:
        """Every shard's answer (None for a missing one) and the missing shards (only when `partial`)."""

        async def ask(shard: int) -> Any:
            attempt = retried(lambda: call(self.handles[shard]), SEARCH_ATTEMPTS, f"Searcher shard {shard}")
            return await (asyncio.wait_for(attempt, self.timeout_s) if deadline else attempt)

        outcomes = await asyncio.gather(*(ask(shard) for shard in range(self.shards)), return_exceptions=True)
        missing: list[int] = []
        for shard, outcome in enumerate(outcomes):
            if isinstance(outcome, TimeoutError | Unavailable | Overloaded):
                missing.append(shard)
            elif isinstance(outcome, BaseException):
                raise outcome  # our own errors (index unreadable, a bad query) as one Searcher raises them
        if missing and (not partial or len(missing) == self.shards):
            reasons = ", ".join(f"{shard}: {type(outcomes[shard]).__name__}" for shard in missing)
            logger.warning("Searcher shards did not answer (%s)", reasons)
            first = outcomes[missing[0]]
            if isinstance(first, Overloaded):
                raise first
            raise ShardUnavailable(
                f"Index shard {', '.join(map(str, missing))} did not answer in time; try again in a moment."
            )
        return [None if shard in missing else outcome for shard, outcome in enumerate(outcomes)], tuple(missing)

    async def prepare(self, version: str) -> int:
        """Every shard loads and verifies `version`; the live vectors of all of them together."""
        if self.shards == 1:
            count: int = await downstream(self.handles[0].prepare.remote(version))
            return count
        counts, _ = await self._all(lambda handle: handle.prepare.remote(version), partial=False, deadline=False)
        return int(sum(counts))

    async def search(
        self, vectors: np.ndarray, k: int, version: str, live_count: int, id_filter: IdFilter | None = None
    ) -> Answer[tuple[np.ndarray, np.ndarray]]:
        """(scores, ids) of `version` as one Searcher answers them (`live_count`: the version's live vectors)."""

        def call(handle: DeploymentHandle) -> Any:
            if id_filter is None:
                return handle.search.remote(vectors, k, version)
            return handle.search.remote(vectors, k, version, id_filter)

        if self.shards == 1:
            return Answer(await self._one(call))
        parts, missing = await self._all(call, self.allow_partial)
        answered = [part for part in parts if part is not None]
        return Answer(merge_shard_results(answered, result_width(k, live_count), len(vectors)), missing)

    async def stored_vectors(self, ids: np.ndarray, version: str) -> Answer[tuple[np.ndarray, np.ndarray]]:
        """(found, vectors) of live ids in `version` (zeros and False where not found)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.shards == 1:
            return Answer(await self._one(lambda handle: handle.stored_vectors.remote(ids, version)))
        per_call = max(1, STORED_VECTORS_BYTES // (4 * max(self.dim, 1)))
        found = np.zeros(len(ids), dtype=bool)
        vectors = np.zeros((len(ids), self.dim), dtype=np.float32)
        missing: set[int] = set()
        for start in range(0, len(ids), per_call):
            block = ids[start : start + per_call]
            parts, gone = await self._all(functools.partial(call_stored_vectors, block, version), self.allow_partial)
            missing.update(gone)
            block_found, block_vectors = merge_stored_vectors(
                [part for part in parts if part is not None], len(block), self.dim
            )
            found[start : start + len(block)] = block_found
            vectors[start : start + len(block)] = block_vectors
        return Answer((found, vectors), tuple(sorted(missing)))

    async def search_dedup(
        self,
        vectors: np.ndarray,
        k: int,
        version: str,
        live_count: int,
        id_filter: IdFilter | None,
        threshold: float,
    ) -> Answer[list[DedupRow]]:
        """Per query, k groups of near-duplicates (serve_app/queries/dedup_search.py), inside the filter."""
        if self.shards == 1:
            rows = await self._one(lambda handle: handle.search_dedup.remote(vectors, k, version, id_filter, threshold))
            return Answer(rows)
        available = live_count if id_filter is None else min(live_count, id_filter.count)
        if available <= 0:
            return Answer([DedupRow(np.empty(0, np.float32), np.empty(0, np.int64), []) for _ in vectors])
        missing: set[int] = set()

        async def search(query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
            answer = await self.search(query, n, version, live_count, id_filter)
            missing.update(answer.missing)
            return answer.value

        async def vectors_of(ids: np.ndarray) -> np.ndarray:
            answer = await self.stored_vectors(ids, version)
            missing.update(answer.missing)
            return answer.value[1]

        queries = np.asarray(vectors, dtype=np.float32)
        rows = await asyncio.gather(
            *(
                dedup_search_async(search, vectors_of, queries[i : i + 1], k, available, threshold)
                for i in range(len(queries))
            )
        )
        return Answer(list(rows), tuple(sorted(missing)))

    async def duplicate_pairs(self, version: str, threshold: float) -> DuplicatePairs:
        """Near-duplicate live id pairs of `version`: every shard needed (never partial)."""
        if self.shards == 1:
            found: DuplicatePairs = await self._one(lambda handle: handle.duplicate_pairs.remote(version, threshold))
            return found
        started = time.monotonic()
        own, _ = await self._all(
            lambda handle: handle.duplicate_pairs.remote(version, threshold), partial=False, deadline=False
        )
        parts = [result.pairs for result in own]
        complete = all(result.complete for result in own)
        for shard in range(self.shards - 1):
            offset: int | None = 0
            while offset is not None and complete:
                if time.monotonic() - started > MAX_DUPLICATE_SECONDS:
                    complete = False
                    break
                ids, block, offset = await self._one_shard(
                    shard, functools.partial(call_live_block, version, offset, QUERY_BLOCK)
                )
                if not len(ids):
                    continue
                cross = functools.partial(call_cross_pairs, ids, block, version, threshold)
                later = await asyncio.gather(
                    *(self._one_shard(other, cross) for other in range(shard + 1, self.shards))
                )
                parts.extend(later)
                if sum(len(p) for p in parts) >= MAX_DUPLICATE_PAIRS:
                    complete = False
        pairs, whole = merge_pairs(parts)
        return DuplicatePairs(pairs, complete and whole)

    async def _one_shard(self, shard: int, call: Callable[[DeploymentHandle], Awaitable[T]]) -> T:
        result: T = await retried(lambda: call(self.handles[shard]), SEARCH_ATTEMPTS, f"Searcher shard {shard}")
        return result


# The calls, bound to their arguments (a loop's lambda would see the loop's last values).
def call_stored_vectors(ids: np.ndarray, version: str, handle: DeploymentHandle) -> Any:
    return handle.stored_vectors.remote(ids, version)


def call_live_block(version: str, offset: int, limit: int, handle: DeploymentHandle) -> Any:
    return handle.live_block.remote(version, offset, limit)


def call_cross_pairs(
    ids: np.ndarray, block: np.ndarray, version: str, threshold: float, handle: DeploymentHandle
) -> Any:
    return handle.cross_pairs.remote(ids, block, version, threshold)
