"""Searcher deployment: the read-only segments of the index versions it is asked for, replicated.

Every search names its index version (the Ingress's, see serve_app/versions.py). A version is a
list of immutable segments plus the ids dead in each (image_search/segments.py); a replica keeps
each segment it loaded (its FAISS index, memory-mapped, so replicas on one node share the page
cache; S3 segments are downloaded once per node into `cache_dir`) and each held version is those
segments with that version's deletions filtered inside the FAISS scan (segment_search.py). A
version that adds one small segment costs its version file and that segment; segments no held
version names are dropped (serve_app/segmented_versions.py). A replica starts with CURRENT
loaded, never with a version pinned at deploy time, and preloads each newly published version, so
it is ready when the Ingress switches. On S3, the node cache drops the segment folders no version
still listed in the store names (`prune_segment_cache`).

With `searcher.shards: N` there are N Searcher deployments; each replica of shard i holds only the
segments image_search/shards.py assigns to shard i (its versions are `version_shard` views of the
version files), and the Ingress merges the shards' answers (serve_app/sharded_searcher.py);
`live_block` and `cross_pairs` serve the duplicate pairs that span shards.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from ray import serve

from image_search.artifact import DEFAULT_CACHE_DIR
from image_search.duplicate_pairs import DuplicatePairs, cross_pairs, duplicate_pairs, live_block
from image_search.errors import IndexUnavailable, StoreUnavailable
from image_search.faiss_index import apply_search_params
from image_search.filtered_search import IdFilter, SegmentRows, search_filtered, stored_vectors
from image_search.fp16_scan import Fp16Scan
from image_search.segment_search import SearchableSegment, search_segments, searchable
from image_search.segments import (
    SegmentInfo,
    Version,
    open_segment_index,
    open_segment_vectors,
    read_pointer,
    read_version,
)
from image_search.shards import version_shard
from image_search.shared_lists import FiledRows, HostLists, SegmentLists, file_under, host_lists, largest_host
from image_search.storage import Store, is_s3_uri, open_store
from serve_app.computed_once import ComputedOnce
from serve_app.config import SearcherOptions
from serve_app.loaded_versions import Preloader
from serve_app.metrics import SearcherMetrics
from serve_app.queries.dedup_search import DedupRow, dedup_search
from serve_app.search_thread import SearchThread
from serve_app.segment_cache import DEFAULT_CACHE_GRACE_S, SegmentCache
from serve_app.segmented_versions import SegmentedVersions
from serve_app.stage_times import Snapshot, StageTimes
from serve_app.store_faults import io_failures_are_transient

logger = logging.getLogger("ray.serve")
DUPLICATE_CACHE_ENTRIES = 4  # (version, threshold) duplicate scans kept per replica


class QueryShapeError(RuntimeError):
    """Our own Ingress sent queries of the wrong shape: an internal fault (500 with a log line), not a 4xx."""


@dataclass(frozen=True)
class LoadedSegment:
    name: str
    index: faiss.Index
    rows: SegmentRows  # ids per row and the raw vectors (filtered exact scans, stored vectors)
    fp16_scan: Fp16Scan | None = None  # small Flat segments: built once, used by every version
    lists: HostLists | None = None  # an IVF-Flat segment's own lists: it can host the small ones
    # A Flat segment filed under a host's lists (image_search/shared_lists.py), by host name: built
    # once, kept for the newest host only (a retained version holds its own reference).
    filed: dict[str, FiledRows | None] = field(default_factory=dict, compare=False)

    def filed_under(self, host: HostLists) -> FiledRows | None:
        if host.name not in self.filed:
            filed = file_under(host, self.index)
            self.filed.clear()
            self.filed[host.name] = filed
        return self.filed[host.name]


@dataclass(frozen=True)
class LoadedIndex:
    """One version as searched: its segments, each with the version's dead ids filtered in the scan."""

    version: str
    segments: tuple[SearchableSegment, ...]
    dim: int
    count: int  # live vectors
    rows: tuple[SegmentRows, ...] = ()  # per segment, in the same order


def load_segment(store: Store, options: SearcherOptions, cache_dir: Path, info: SegmentInfo) -> LoadedSegment:
    """One segment, verified and mapped, with the configured search-time knobs applied."""
    index = open_segment_index(store, info, cache_dir)
    params = dict(info.index.get("params", {}))
    params.update(
        {key: value for key, value in (("nprobe", options.nprobe), ("ef_search", options.ef_search)) if value}
    )
    apply_search_params(index, params)
    # Row i of vectors.npy is the i-th vector added to the IndexIDMap2: its id_map says under which id.
    ids = faiss.vector_to_array(getattr(faiss.downcast_index(index), "id_map"))  # noqa: B009  (untyped SWIG)
    rows = SegmentRows.of(ids, open_segment_vectors(store, info, cache_dir))
    return LoadedSegment(info.name, index, rows, Fp16Scan.of(index), host_lists(info.name, index))


def assemble_index(version: Version, segments: Sequence[LoadedSegment]) -> LoadedIndex:
    # The largest IVF-Flat segment hosts the Flat ones: they are scanned through its lists.
    host = largest_host([(s.lists, s.index.ntotal - len(version.deleted_ids(s.name))) for s in segments])

    def lists_of(segment: LoadedSegment) -> SegmentLists | None:
        if host is None:
            return None
        if segment.lists is not None:  # the host itself, or another IVF segment (searched on its own lists)
            return host if segment.lists is host else None
        return segment.filed_under(host)

    searchables = tuple(
        searchable(segment.name, segment.index, version.deleted_ids(segment.name), segment.fp16_scan, lists_of(segment))
        for segment in segments
    )
    rows = tuple(segment.rows for segment in segments)
    return LoadedIndex(version.name, searchables, version.embedding_dim, version.live_count, rows)


class SegmentHoldings:
    """What one Searcher replica holds, without Ray: versions by name, assembled from shared segments.

    `get(name)` raises ArtifactError when the version is unusable, StoreUnavailable when its files
    cannot be read just now. `segment_loads` counts the segments loaded (operators and tests).
    """

    def __init__(
        self,
        store: Store,
        options: SearcherOptions,
        cache_dir: Path,
        cache_grace_s: float = DEFAULT_CACHE_GRACE_S,
        shard: int = 0,
    ) -> None:
        self.store = store
        # With options.shards > 1 this replica holds only shard `shard`'s segments of each version.
        self.shard = shard
        self.shards = options.shards
        # Remote segments are cached on the node; a local store's files are read where they are.
        self.cache = SegmentCache(store, cache_dir, cache_grace_s) if is_s3_uri(store.uri) else None
        self.pruning: asyncio.Task[list[str]] | None = None
        self.segment_loads: list[str] = []
        self.version_reads: list[str] = []
        self._load_segment = functools.partial(load_segment, store, options, cache_dir)
        self.versions: SegmentedVersions[LoadedSegment, LoadedIndex] = SegmentedVersions(
            options.max_versions, self._read_version, self._load_counted, assemble_index
        )

    def _read_version(self, name: str) -> Version:
        self.version_reads.append(name)
        return version_shard(read_version(self.store, name), self.shard, self.shards)

    def _load_counted(self, info: SegmentInfo) -> LoadedSegment:
        started = time.perf_counter()
        loaded = self._load_segment(info)
        self.segment_loads.append(info.name)
        logger.info(
            "Searcher loaded segment %s: %d vectors in %.2f s", info.name, info.count, time.perf_counter() - started
        )
        return loaded

    async def get(self, name: str) -> LoadedIndex:
        fresh = name not in self.versions
        with io_failures_are_transient(f"index version {name} at {self.store.uri}"):
            loaded = await self.versions.get(name)
        if fresh and self.cache is not None and (self.pruning is None or self.pruning.done()):
            # After a new version loads (not on every search), in the background: never fails a load.
            self.pruning = asyncio.get_running_loop().create_task(asyncio.to_thread(self.prune_cache))
        return loaded

    def __contains__(self, name: str) -> bool:
        return name in self.versions

    def prune_cache(self) -> list[str]:
        """Drop cached segments no version listed in the store (nor held here) names."""
        if self.cache is None:
            return []
        try:
            return self.cache.prune(keep=set(self.versions.segment_names()))
        except Exception as exc:
            logger.warning("could not prune the segment cache %s: %s", self.cache.root, exc)
            return []

    def names(self) -> list[str]:
        return self.versions.names()


def check_queries(vectors: np.ndarray, dim: int) -> np.ndarray:
    """(n, dim) float32, C-contiguous, or QueryShapeError (never a silent reshape of a wrong shape)."""
    queries = np.asarray(vectors)
    if queries.ndim != 2 or queries.shape[1] != dim or queries.shape[0] == 0:
        raise QueryShapeError(f"queries must be (n >= 1, {dim}); got shape {queries.shape}")
    return np.ascontiguousarray(queries, dtype=np.float32)


@serve.deployment(
    name="Searcher",
    num_replicas=2,
    max_ongoing_requests=32,
    ray_actor_options={"num_cpus": 0.25},
    health_check_period_s=10,
    # A replica that cannot load its model or index will not do better on the 20th try.
    max_constructor_retry_count=3,
)
class Searcher:
    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self,
        index_root: str,
        options: SearcherOptions,
        cache_dir: str | None,
        reload_interval_s: float,
        shard: int = 0,
    ) -> None:
        self.store = open_store(index_root)
        self.options = options
        self.thread = SearchThread(options.num_threads)
        self.holdings = SegmentHoldings(
            self.store, options, Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR, shard=shard
        )
        self.metrics = SearcherMetrics()
        self.stages = StageTimes()  # where a search's time goes here (benchmarks/served.py reads it)
        self.duplicates: ComputedOnce[tuple[str, float], DuplicatePairs] = ComputedOnce(DUPLICATE_CACHE_ENTRIES)
        # Warm start on what is published now. If CURRENT is broken (a bad build the running
        # Ingress refused), this replica still starts and loads what the Ingress asks for.
        preloader = Preloader(self.holdings, self._read_current)
        if await preloader.preload_once() is None and not self.holdings.names():
            logger.error("Searcher starts without an index: CURRENT is missing or not serveable")
        self.preloading = asyncio.get_running_loop().create_task(preloader.run(reload_interval_s))

    async def _read_current(self) -> str:
        name = await asyncio.to_thread(read_pointer, self.store)
        if name is None:
            raise StoreUnavailable(f"no CURRENT at {self.store.uri} yet")
        return name

    async def prepare(self, version: str) -> int:
        """Load (or find) `version`; its live vector count. Raises ArtifactError when it fails its
        checks, StoreUnavailable when its files cannot be read just now."""
        return (await self.holdings.get(version)).count

    async def _loaded(self, version: str) -> LoadedIndex:
        try:
            return await self.holdings.get(version)
        except StoreUnavailable as exc:
            logger.warning("a search needed index version %s, which cannot be read just now: %s", version, exc)
            raise IndexUnavailable("The index cannot be read right now; try again in a moment.") from None

    async def search(
        self, vectors: np.ndarray, k: int, version: str, id_filter: IdFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) unit vectors -> (scores, ids) of `version`, each (n, min(k, live count)), best first.

        Ids are the stable record ids; exact across segments (segment_search.py); -1 pads when an
        approximate segment finds fewer. With `id_filter`, only the ids it allows, inside the scan
        (image_search/filtered_search.py).
        """
        arrived = time.perf_counter()
        loaded = await self._loaded(version)
        queries = check_queries(vectors, loaded.dim)
        started = time.perf_counter()
        result: tuple[np.ndarray, np.ndarray]
        if id_filter is None:
            result = await self.thread.run(search_segments, loaded.segments, queries, max(1, min(k, loaded.count)))
        else:
            result = await self.thread.run(
                search_filtered, loaded.segments, loaded.rows, queries, max(1, min(k, loaded.count)), id_filter
            )
        finished = time.perf_counter()
        # After the answer leaves (a callback behind it): recording a Ray metric costs ~0.1 ms.
        asyncio.get_running_loop().call_soon(self.metrics.observe_search, finished - started)
        self.stages.add("search (on its thread)", finished - started)
        self.stages.add("in replica", finished - arrived)
        return result

    async def stage_times(self) -> tuple[int, Snapshot]:
        """This replica's pid and its seconds summed per stage of `search` (serve_app/stage_times.py)."""
        return os.getpid(), self.stages.snapshot()

    async def search_dedup(
        self, vectors: np.ndarray, k: int, version: str, id_filter: IdFilter | None, threshold: float
    ) -> list[DedupRow]:
        """Per query, k groups of near-duplicates (serve_app/queries/dedup_search.py), inside the filter."""
        loaded = await self._loaded(version)
        queries = check_queries(vectors, loaded.dim)
        available = loaded.count if id_filter is None else min(loaded.count, id_filter.count)
        if available <= 0:
            return [DedupRow(np.empty(0, np.float32), np.empty(0, np.int64), []) for _ in queries]

        def search(query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
            if id_filter is None:
                return search_segments(loaded.segments, query, n)
            return search_filtered(loaded.segments, loaded.rows, query, n, id_filter)

        def vectors_of(ids: np.ndarray) -> np.ndarray:
            return stored_vectors(loaded.segments, loaded.rows, ids, loaded.dim)[1]

        def run() -> list[DedupRow]:
            return [
                dedup_search(search, vectors_of, queries[i : i + 1], k, available, threshold)
                for i in range(len(queries))
            ]

        started = time.perf_counter()
        rows: list[DedupRow] = await self.thread.run(run)
        self.metrics.observe_search(time.perf_counter() - started)
        return rows

    async def duplicate_pairs(self, version: str, threshold: float) -> DuplicatePairs:
        """Near-duplicate live id pairs of `version` (image_search/duplicate_pairs.py), computed once per
        version and threshold (the last few kept); callers asking at once share one computation."""

        async def compute() -> DuplicatePairs:
            loaded = await self._loaded(version)
            pairs: DuplicatePairs = await self.thread.run(
                duplicate_pairs, loaded.segments, loaded.rows, float(threshold)
            )
            return pairs

        return await self.duplicates.get((version, float(threshold)), compute)

    async def stored_vectors(self, ids: np.ndarray, version: str) -> tuple[np.ndarray, np.ndarray]:
        """(found (n,) bool, vectors (n, dim)): the vectors `version` holds for these live ids."""
        loaded = await self._loaded(version)
        result: tuple[np.ndarray, np.ndarray] = await self.thread.run(
            stored_vectors, loaded.segments, loaded.rows, np.asarray(ids, dtype=np.int64), loaded.dim
        )
        return result

    async def live_block(self, version: str, offset: int, limit: int) -> tuple[np.ndarray, np.ndarray, int | None]:
        """This shard's live (ids, vectors) among its stored rows [offset, offset + limit), and the next
        offset (None at the end): the queries for the duplicate pairs that span shards."""
        loaded = await self._loaded(version)
        result: tuple[np.ndarray, np.ndarray, int | None] = await self.thread.run(
            live_block, loaded.segments, loaded.rows, int(offset), int(limit)
        )
        return result

    async def cross_pairs(self, ids: np.ndarray, vectors: np.ndarray, version: str, threshold: float) -> np.ndarray:
        """Pairs of another shard's live vectors (`ids`, `vectors`) with this shard's at cosine >= threshold."""
        loaded = await self._loaded(version)
        queries = check_queries(vectors, loaded.dim)
        pairs: np.ndarray = await self.thread.run(
            cross_pairs, loaded.segments, np.asarray(ids, dtype=np.int64), queries, float(threshold)
        )
        return pairs

    def omp_threads(self) -> int:
        """The OpenMP team size on the thread where searches run (for operators and tests)."""
        return self.thread.omp_threads()

    async def check_health(self) -> None:
        """The search thread answers: a stuck FAISS call or a dead thread makes the replica unhealthy."""
        if self.preloading.done():
            raise RuntimeError("the Searcher stopped watching for new index versions")
        newest = self.holdings.versions.newest()
        if newest is None:
            await asyncio.wait_for(self.thread.run(faiss.omp_get_max_threads), self.options.health_timeout_s)
            return
        probe = np.zeros((1, newest.dim), dtype=np.float32)
        await asyncio.wait_for(
            self.thread.run(search_segments, newest.segments, probe, 1), self.options.health_timeout_s
        )
