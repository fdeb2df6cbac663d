"""Building, tuning, writing and mapping FAISS indexes; no storage, no versions (see segments.py).

Every index is an `IndexIDMap2` around the factory's index: `search` returns the records' stable
ids, not positions. A segment keeps its raw vectors beside its index (segments.py), so nothing
needs to get vectors back out of an index; `reconstruct_vectors` remains for tests and tools.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from image_search.index_spec import IndexSpec

TRAINING_SAMPLE_SEED = 0


# Memory-mapped codes: replicas on one node share the page cache instead of each holding a copy.
# Checked with faiss-cpu 1.15 (/proc/self/maps): IO_FLAG_MMAP maps IVF inverted lists but reads a
# Flat index (under an IDMap2) into memory; IO_FLAG_MMAP_IFC maps the codes of both. The IDMap2's
# id arrays (16 bytes an image, plus its hash map) stay private to each process.
MMAP_FLAGS = faiss.IO_FLAG_MMAP_IFC


def build_faiss_index(
    vectors: np.ndarray, spec: IndexSpec, ids: np.ndarray | None = None, centroids: np.ndarray | None = None
) -> faiss.Index:
    """An IDMap2 index of `vectors` under `ids` (default 0..n-1), rows added in the given order.

    `centroids`: an IVF's coarse centroids to reuse instead of training (compaction keeps those of the
    largest segment it merges, trained on most of the same vectors); ignored unless they fit the spec.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.arange(len(vectors), dtype=np.int64) if ids is None else np.ascontiguousarray(ids, dtype=np.int64)
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    inner = faiss.index_factory(vectors.shape[1], spec.factory, faiss.METRIC_INNER_PRODUCT)
    reuse = centroids is not None and ivf_centroids_fit(inner, centroids)
    if reuse:
        assert centroids is not None
        ivf = faiss.extract_index_ivf(inner)
        ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
        ivf.is_trained = True
    if not inner.is_trained:
        rows = spec.training_rows(len(vectors))
        # A fixed seed: the same collection gives the same index, build after build.
        chosen = np.sort(np.random.default_rng(TRAINING_SAMPLE_SEED).choice(len(vectors), rows, replace=False))
        inner.train(vectors[chosen])
    index = faiss.IndexIDMap2(inner)  # faiss's wrapper keeps a reference to `inner`
    index.add_with_ids(vectors, ids)
    apply_search_params(index, spec.params)
    return index


def ivf_centroids_fit(index: faiss.Index, centroids: np.ndarray) -> bool:
    """Whether `centroids` can be an untrained IVF-Flat index's coarse quantiser (same list count and dim)."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return bool(centroids.shape == (ivf.nlist, ivf.d) and ivf.quantizer.ntotal == 0 and not ivf.is_trained)


def ivf_centroids(index: faiss.Index) -> np.ndarray | None:
    """The coarse centroids of an IVF index (None for other indexes)."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
    return np.asarray(ivf.quantizer.reconstruct_n(0, ivf.nlist), dtype=np.float32)


def reconstruct_vectors(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """The stored vectors of these record ids, in that order (an IVF index gets a direct map first)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    with contextlib.suppress(RuntimeError):  # not an IVF index: reconstruct works as is
        faiss.extract_index_ivf(index).make_direct_map()
    if len(ids) == 0:
        return np.zeros((0, index.d), dtype=np.float32)
    return np.asarray(index.reconstruct_batch(ids), dtype=np.float32)


def write_index_file(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


def map_index_file(path: Path) -> faiss.Index:
    """Open an index file memory-mapped, read-only (see MMAP_FLAGS)."""
    return faiss.read_index(str(path), MMAP_FLAGS)


def read_index_file(path: Path) -> faiss.Index:
    """Read an index file into memory (benchmarks/search_at_scale.py compares it with the mapped one)."""
    return faiss.read_index(str(path))


def raise_quantizer_ef_search(index: faiss.Index, nprobe: int) -> None:
    """An HNSW coarse quantiser (IVF..._HNSW32) must search at least nprobe candidates: with FAISS's
    default efSearch (16) it finds the nearest lists only approximately and recall plateaus whatever
    nprobe is (measured: recall@10 0.895 at nprobe 512 of 8192 lists on 1M CLIP-like vectors)."""
    with contextlib.suppress(RuntimeError):  # not an IVF index
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = max(int(quantizer.hnsw.efSearch), int(nprobe))


def apply_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """Set search-time knobs (nprobe for IVF, efSearch for HNSW) where the index has them."""
    if params.get("nprobe") is not None:
        with contextlib.suppress(RuntimeError):  # not an IVF index: nothing to set
            faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
        raise_quantizer_ef_search(index, int(params["nprobe"]))
    if params.get("ef_search") is not None and hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(params["ef_search"])
