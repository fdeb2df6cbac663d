"""FAISS indexes under stable ids, vector reuse, and when a published index's vectors may be reused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from image_search.faiss_index import (
    build_faiss_index,
    map_index_file,
    reconstruct_vectors,
    write_index_file,
)
from image_search.index_spec import IndexSpec
from index_builder.build import ModelInfo, full_rebuild_reason
from tests.support import sample_manifest


def unit_vectors(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_search_returns_record_ids_and_mapped_files_reconstruct_exactly(factory: str, tmp_path: Path) -> None:
    vectors = unit_vectors(2000)
    ids = np.arange(2000, dtype=np.int64) * 3 + 5  # sparse ids, as after removals
    index = build_faiss_index(vectors, IndexSpec(factory, {"nprobe": 16}), ids)
    _, found = index.search(vectors[[0, 7]], 1)
    assert found[:, 0].tolist() == [5, 26]
    write_index_file(index, tmp_path / "index.faiss")
    mapped = map_index_file(tmp_path / "index.faiss")
    np.testing.assert_array_equal(reconstruct_vectors(mapped, np.array([26, 5])), vectors[[7, 0]])


def test_full_rebuild_reasons() -> None:
    published = sample_manifest(model_fingerprint="f1", embedding_dim=32, preprocessing={"size": 224}, precision="fp32")
    model = ModelInfo(name="m", fingerprint="f1", embedding_dim=32, preprocessing={"size": 224}, precision="fp32")
    assert full_rebuild_reason(published, model) is None
    assert "model changed (fingerprint f1 -> f2)" in str(
        full_rebuild_reason(published, replace(model, fingerprint="f2"))
    )
    assert "preprocessing" in str(full_rebuild_reason(published, replace(model, preprocessing={"size": 336})))
    assert "precision changed (fp32 -> bf16)" in str(full_rebuild_reason(published, replace(model, precision="bf16")))
    # A lossy published index no longer forces a rebuild: segments keep their raw vectors beside it.
    lossy = replace(published, index={"factory": "IVF256,PQ16", "params": {}})
    assert full_rebuild_reason(lossy, model) is None
