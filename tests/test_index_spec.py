"""Index-type choice is a pure function of collection size: a table test."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from image_search.faiss_index import build_faiss_index
from image_search.index_spec import EXACT_SEARCH_LIMIT, IndexSpec, choose_index_spec, ivf_list_count


@pytest.mark.parametrize(
    ("count", "factory", "params"),
    [
        (1, "Flat", {}),
        (128, "Flat", {}),
        (EXACT_SEARCH_LIMIT, "Flat", {}),
        (EXACT_SEARCH_LIMIT + 1, "IVF1024,Flat", {"nprobe": 32}),
        (1_000_000, "IVF4096,Flat", {"nprobe": 32}),
        (100_000_000, "IVF32768,Flat", {"nprobe": 32}),
    ],
)
def test_choice_by_size(count: int, factory: str, params: dict) -> None:
    assert choose_index_spec(count, 512) == IndexSpec(factory, params)


def test_list_count_leaves_enough_training_points() -> None:
    for count in (2_000, 50_000, 200_000, 10_000_000):
        assert count // ivf_list_count(count) >= 39 or ivf_list_count(count) == 16


@pytest.mark.parametrize(
    ("factory", "count", "rows"),
    [
        ("Flat", 50, 0),
        ("IVF16,Flat", 500, 500),
        ("IVF16,Flat", 1024, 1024),
        ("IVF16,Flat", 1025, 1024),
        ("IVF4096,Flat", 1_000_000, 262_144),
    ],
)
def test_kmeans_trains_on_a_bounded_sample(factory: str, count: int, rows: int) -> None:
    assert IndexSpec(factory).training_rows(count) == rows


def test_ivf_builds_are_reproducible() -> None:
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(3000, 8)).astype(np.float32)
    spec = IndexSpec("IVF16,Flat", {"nprobe": 4})
    first, second = (faiss.serialize_index(build_faiss_index(vectors, spec)) for _ in range(2))
    assert np.array_equal(first, second)


def test_empty_collection_is_refused() -> None:
    with pytest.raises(ValueError):
        choose_index_spec(0, 512)


def test_ivf_spec_builds_and_finds_exact_neighbours_of_stored_vectors() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(4000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = build_faiss_index(vectors, IndexSpec("IVF64,Flat", {"nprobe": 64}))
    _, ids = index.search(vectors[:50], 1)
    assert ids[:, 0].tolist() == list(range(50))
