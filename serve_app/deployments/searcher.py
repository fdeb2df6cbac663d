"""Searcher deployment: a read-only FAISS index, replicated."""

from __future__ import annotations

import logging
import time

import faiss
import numpy as np
from ray import serve

from image_search.artifact import load_artifact
from image_search.faiss_index import apply_search_params
from image_search.storage import open_store
from serve_app.config import SearcherOptions
from serve_app.metrics import SearcherMetrics

logger = logging.getLogger("ray.serve")


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
    def __init__(self, index_root: str, version_folder: str, options: SearcherOptions) -> None:
        faiss.omp_set_num_threads(options.num_threads)
        artifact = load_artifact(open_store(index_root), version_folder)
        self.index = artifact.index
        self.count = artifact.manifest.count
        self.dim = artifact.manifest.embedding_dim
        params = dict(artifact.manifest.index.get("params", {}))
        params.update(
            {key: value for key, value in (("nprobe", options.nprobe), ("ef_search", options.ef_search)) if value}
        )
        apply_search_params(self.index, params)
        self.metrics = SearcherMetrics()
        logger.info("Searcher ready: %d vectors from %s", self.count, artifact.location)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) unit vectors -> (scores, ids), each (n, min(k, count)), best first."""
        queries = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        started = time.perf_counter()
        scores, ids = self.index.search(queries, min(k, self.count))
        self.metrics.observe_search(time.perf_counter() - started)
        return scores, ids

    def check_health(self) -> None:
        if self.index is None or self.index.ntotal != self.count:
            raise RuntimeError("the index is not loaded")
