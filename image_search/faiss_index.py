"""Building, tuning and (de)serialising FAISS indexes; no storage, no versions (see artifact.py)."""

from __future__ import annotations

import contextlib
from typing import Any

import faiss
import numpy as np

from image_search.index_spec import IndexSpec

TRAINING_SAMPLE_SEED = 0


def build_faiss_index(vectors: np.ndarray, spec: IndexSpec) -> faiss.Index:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.index_factory(vectors.shape[1], spec.factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rows = spec.training_rows(len(vectors))
        # A fixed seed: the same collection gives the same index, build after build.
        chosen = np.sort(np.random.default_rng(TRAINING_SAMPLE_SEED).choice(len(vectors), rows, replace=False))
        index.train(vectors[chosen])
    index.add(vectors)
    apply_search_params(index, spec.params)
    return index


def apply_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """Set search-time knobs (nprobe for IVF, efSearch for HNSW) where the index has them."""
    if params.get("nprobe") is not None:
        with contextlib.suppress(RuntimeError):  # not an IVF index: nothing to set
            faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if params.get("ef_search") is not None and hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(params["ef_search"])


def serialize_index(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize_index(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
