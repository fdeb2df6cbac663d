"""Searcher deployment: read-only FAISS indexes of the versions it is asked for, replicated.

Every search names its index version (the Ingress's, see serve_app/versions.py). A replica holds
the few versions it was asked for, memory-mapped through `open_index` (so replicas on one node
share the page cache instead of holding private copies; S3 artifacts are downloaded once per node
into `cache_dir`), and loads a named version it lacks on demand. It starts with CURRENT loaded,
never with a version pinned at deploy time, so a replica replaced after several rebuilds finds its
files, and it preloads each newly published version, so it is ready when the Ingress switches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from ray import serve

from image_search.artifact import DEFAULT_CACHE_DIR, load_manifest, open_index, read_current, version_folder
from image_search.errors import ArtifactError, IndexUnavailable, StoreUnavailable
from image_search.faiss_index import apply_search_params
from image_search.storage import Store, open_store
from serve_app.config import SearcherOptions
from serve_app.loaded_versions import LoadedVersions, Preloader
from serve_app.metrics import SearcherMetrics
from serve_app.search_thread import SearchThread
from serve_app.store_faults import io_failures_are_transient

logger = logging.getLogger("ray.serve")


class QueryShapeError(RuntimeError):
    """Our own Ingress sent queries of the wrong shape: an internal fault (500 with a log line), not a 4xx."""


@dataclass(frozen=True)
class LoadedIndex:
    version: str
    index: faiss.Index
    dim: int
    count: int


def load_index_version(store: Store, version: str, options: SearcherOptions, cache_dir: Path) -> LoadedIndex:
    """One published version, verified and mapped, with the configured search-time knobs applied.

    ArtifactError when the version is unusable; StoreUnavailable when its files cannot be read now.
    """
    folder = version_folder(version)
    with io_failures_are_transient(f"index version {version} at {store.uri}"):
        manifest = load_manifest(store, folder)
        index = open_index(store, folder, manifest, cache_dir)
    if index.d != manifest.embedding_dim:
        raise ArtifactError(
            f"{store.uri}/{folder}: the index holds {index.d}-d vectors but its manifest says "
            f"{manifest.embedding_dim}; rebuild the index"
        )
    params = dict(manifest.index.get("params", {}))
    params.update(
        {key: value for key, value in (("nprobe", options.nprobe), ("ef_search", options.ef_search)) if value}
    )
    apply_search_params(index, params)
    return LoadedIndex(version=version, index=index, dim=int(index.d), count=int(index.ntotal))


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
        self, index_root: str, options: SearcherOptions, cache_dir: str | None, reload_interval_s: float
    ) -> None:
        self.store = open_store(index_root)
        self.options = options
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR
        self.thread = SearchThread(options.num_threads)
        self.versions: LoadedVersions[LoadedIndex] = LoadedVersions(options.max_versions, self._load)
        self.metrics = SearcherMetrics()
        # Warm start on what is published now. If CURRENT is broken (a bad build the running
        # Ingress refused), this replica still starts and loads what the Ingress asks for.
        preloader = Preloader(self.versions, self._read_current)
        if await preloader.preload_once() is None and not self.versions.names():
            logger.error("Searcher starts without an index: CURRENT is missing or not serveable")
        self.preloading = asyncio.get_running_loop().create_task(preloader.run(reload_interval_s))

    async def _read_current(self) -> str:
        return await asyncio.to_thread(read_current, self.store)

    def _load(self, version: str) -> LoadedIndex:
        started = time.perf_counter()
        loaded = load_index_version(self.store, version, self.options, self.cache_dir)
        logger.info(
            "Searcher loaded index version %s: %d vectors in %.2f s (holding %s)",
            version,
            loaded.count,
            time.perf_counter() - started,
            self.versions.names(),
        )
        return loaded

    async def prepare(self, version: str) -> int:
        """Load (or find) `version`; its vector count. Raises ArtifactError when it fails its checks,
        StoreUnavailable when its files cannot be read just now."""
        return (await self.versions.get(version)).count

    async def search(self, vectors: np.ndarray, k: int, version: str) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) unit vectors -> (scores, ids) of `version`, each (n, min(k, count)), best first.

        Ids are the index's stable record ids (-1 pads when fewer than k vectors exist).
        """
        try:
            loaded = await self.versions.get(version)
        except StoreUnavailable as exc:
            logger.warning("a search needed index version %s, which cannot be read just now: %s", version, exc)
            raise IndexUnavailable("The index cannot be read right now; try again in a moment.") from None
        queries = check_queries(vectors, loaded.dim)
        started = time.perf_counter()
        result: tuple[np.ndarray, np.ndarray] = await self.thread.run(
            loaded.index.search, queries, max(1, min(k, loaded.count))
        )
        self.metrics.observe_search(time.perf_counter() - started)
        return result

    def held_versions(self) -> list[str]:
        """Versions this replica holds, least recently used first (for operators and tests)."""
        return self.versions.names()

    def omp_threads(self) -> int:
        """The OpenMP team size on the thread where searches run (for operators and tests)."""
        return self.thread.omp_threads()

    async def check_health(self) -> None:
        """The search thread answers: a stuck FAISS call or a dead thread makes the replica unhealthy."""
        if self.preloading.done():
            raise RuntimeError("the Searcher stopped watching for new index versions")
        newest = self.versions.newest()
        if newest is None:
            await asyncio.wait_for(self.thread.run(faiss.omp_get_max_threads), self.options.health_timeout_s)
            return
        probe = np.zeros((1, newest.dim), dtype=np.float32)
        await asyncio.wait_for(self.thread.run(newest.index.search, probe, 1), self.options.health_timeout_s)
