"""Index choice by size, memory budget and recall target: the planner's table, and its memory formulas."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from image_search.faiss_index import build_faiss_index
from image_search.index_planner import (
    IDMAP2_BYTES_PER_VECTOR,
    GiB,
    IndexDoesNotFit,
    index_memory_bytes,
    ivf_list_count,
    plan_index,
)
from image_search.index_spec import (
    EXACT_SEARCH_LIMIT,
    MIN_IVF_SEGMENT,
    IndexSpec,
    choose_index_spec,
    choose_segment_index_spec,
    merged_segment_spec,
)

MiB = 2**20
TiB = 2**40


@pytest.mark.parametrize(
    ("count", "dim", "budget", "factory", "keyword"),
    [
        (1, 512, 4 * GiB, "Flat", "exact"),
        (EXACT_SEARCH_LIMIT, 512, 4 * GiB, "Flat", "exact"),
        (EXACT_SEARCH_LIMIT + 1, 512, 4 * GiB, "IVF1024,Flat", "lossless"),
        (500_000, 512, 4 * GiB, "IVF2048,Flat", "4*sqrt(N)"),
        (1_000_000, 512, 4 * GiB, "IVF4096,Flat", "lossless"),
        # 2M x 512 floats are 3.9 GiB: just fits; the guideline's 65536 lists are capped for training data.
        (2_000_000, 512, 4 * GiB, "IVF16384_HNSW32,Flat", "capped"),
        (1_000_000, 512, 1 * GiB, "IVF4096,SQ8", "8-bit"),
        (5_000_000, 512, 4 * GiB, "IVF65536_HNSW32,SQ8", "8-bit"),
        (5_000_000, 512, 24 * GiB, "IVF65536_HNSW32,Flat", "lossless"),
        (10_000_000, 512, 4 * GiB, "OPQ256_512,IVF65536_HNSW32,PQ256x8", "lossy"),
        (20_000_000, 512, 4 * GiB, "OPQ64_256,IVF262144_HNSW32,PQ64x8", "lossy"),
        (100_000_000, 512, 24 * GiB, "OPQ128_512,IVF262144_HNSW32,PQ128x8", "lossy"),
        (100_000_000, 512, 128 * GiB, "IVF262144_HNSW32,SQ8", "8-bit"),
        (1_000_000_000, 512, 128 * GiB, "OPQ64_256,IVF1048576_HNSW32,PQ64x8", "lossy"),
        (1_000_000_000, 512, 4 * TiB, "IVF1048576_HNSW32,Flat", "lossless"),
        # A budget below what Flat needs moves even a small collection to compressed codes.
        (50_000, 512, 40 * MiB, "IVF512,SQ8", "8-bit"),
        (200_000, 64, 4 * GiB, "IVF2048,Flat", "lossless"),
    ],
)
def test_planner_table(count: int, dim: int, budget: int, factory: str, keyword: str) -> None:
    plan = plan_index(count, dim, budget)
    assert (plan.factory, keyword in plan.reason) == (factory, True), plan.reason
    assert plan.estimated_bytes <= budget
    assert plan.estimated_bytes == index_memory_bytes(plan.factory, count, dim)


@pytest.mark.parametrize(
    ("count", "budget", "factory", "keyword"),
    [
        (500_000, 4 * GiB, "HNSW32", "graph"),
        # HNSW's graph (4*d + 272 B a vector) is over 1 GiB at 1M: back to the IVF rule.
        (1_000_000, 1 * GiB, "IVF4096,SQ8", "8-bit"),
        (EXACT_SEARCH_LIMIT, 4 * GiB, "Flat", "exact"),
    ],
)
def test_unmapped_indexes_may_be_graphs(count: int, budget: int, factory: str, keyword: str) -> None:
    plan = plan_index(count, 512, budget, mappable=False)
    assert (plan.factory, keyword in plan.reason, plan.search_param) == (
        factory,
        True,
        {"HNSW32": "ef_search", "Flat": None}.get(factory, "nprobe"),
    )


def test_recall_target_one_asks_for_an_exact_scan() -> None:
    plan = plan_index(5_000_000, 512, 24 * GiB, recall_target=1.0)
    assert (plan.factory, "recall target 1.0" in plan.reason) == ("Flat", True)
    with pytest.raises(IndexDoesNotFit, match="lower the recall target"):
        plan_index(5_000_000, 512, 4 * GiB, recall_target=1.0)


@pytest.mark.parametrize(("count", "budget"), [(100_000_000, 4 * GiB), (1_000_000_000, 24 * GiB)])
def test_nothing_fits_names_the_budget_it_would_take(count: int, budget: int) -> None:
    with pytest.raises(IndexDoesNotFit, match="raise --max-index-memory to") as raised:
        plan_index(count, 512, budget)
    needed = int(str(raised.value).split("raise --max-index-memory to ")[1].split()[0])
    assert plan_index(count, 512, needed).estimated_bytes <= needed


@pytest.mark.parametrize(
    ("count", "dim", "budget", "recall"),
    [(0, 512, GiB, 0.95), (10, 0, GiB, 0.95), (10, 512, 0, 0.95), (10, 512, GiB, 0.0), (10, 512, GiB, 1.5)],
)
def test_bad_planner_input_is_refused(count: int, dim: int, budget: int, recall: float) -> None:
    with pytest.raises(ValueError):
        plan_index(count, dim, budget, recall)


def test_memory_formula_per_type() -> None:
    n, d = 1_000_000, 512
    idmap = IDMAP2_BYTES_PER_VECTOR
    assert index_memory_bytes("Flat", n, d) == n * (4 * d + idmap)
    assert index_memory_bytes("HNSW32", n, d) == n * (4 * d + 256 + 16 + idmap)
    assert index_memory_bytes("IVF4096,Flat", n, d) == n * (4 * d + 8 + idmap) + 4096 * (4 * d + 48)
    assert index_memory_bytes("IVF4096,SQ8", n, d) == n * (d + 8 + idmap) + 4096 * (4 * d + 48) + 8 * d
    assert index_memory_bytes("OPQ64_256,IVF65536_HNSW32,PQ64x8", n, d) == (
        n * (64 + 8 + idmap) + 65536 * (4 * d + 48 + 256 + 16) + 256 * 4 * 256 + 4 * d * 256
    )


@pytest.mark.parametrize(
    ("factory", "count", "dim"),
    [("Flat", 3000, 32), ("IVF16,Flat", 3000, 32), ("IVF16,SQ8", 3000, 32), ("HNSW32", 3000, 32)],
)
def test_memory_formula_matches_faiss_within_a_tenth(factory: str, count: int, dim: int) -> None:
    """The written index (IDMap2 ids included; its reverse map is rebuilt on load) plus the map's cost."""
    vectors = np.random.default_rng(0).standard_normal((count, dim)).astype(np.float32)
    written = len(faiss.serialize_index(build_faiss_index(vectors, IndexSpec(factory))))
    expected = index_memory_bytes(factory, count, dim) - count * (IDMAP2_BYTES_PER_VECTOR - 8)
    assert abs(written - expected) <= 0.1 * expected, (written, expected)


@pytest.mark.parametrize(
    ("count", "factory", "params"),
    [
        (1, "Flat", {}),
        (128, "Flat", {}),
        (EXACT_SEARCH_LIMIT, "Flat", {}),
        (EXACT_SEARCH_LIMIT + 1, "IVF1024,Flat", {"nprobe": 32}),
        (1_000_000, "IVF4096,Flat", {"nprobe": 32}),
    ],
)
def test_choose_index_spec_keeps_its_signature(count: int, factory: str, params: dict) -> None:
    spec = choose_index_spec(count, 512)
    assert spec == IndexSpec(factory, params)
    assert spec.reason


def test_choose_index_spec_takes_a_budget_and_target() -> None:
    assert choose_index_spec(1_000_000, 512, max_memory_bytes=GiB).factory == "IVF4096,SQ8"
    assert choose_index_spec(200_000, 512, recall_target=1.0).factory == "Flat"


def test_spec_round_trips_with_its_reason() -> None:
    spec = choose_index_spec(1_000_000, 512)
    again = IndexSpec.from_dict(spec.to_dict())
    assert (again, again.reason) == (spec, spec.reason)
    assert IndexSpec.from_dict({"factory": "Flat", "params": {}}).reason == ""


def test_list_count_leaves_enough_training_points() -> None:
    for count in (2_000, 50_000, 200_000, 2_000_000, 10_000_000, 20_000_000):
        assert count // ivf_list_count(count) >= 39 or ivf_list_count(count) == 16


@pytest.mark.parametrize(
    ("factory", "count", "rows"),
    [
        ("Flat", 50, 0),
        ("HNSW32", 50, 0),
        ("IVF16,Flat", 500, 500),
        ("IVF16,Flat", 1024, 1024),
        ("IVF16,Flat", 1025, 1024),
        ("IVF4096,Flat", 1_000_000, 262_144),
        ("IVF65536_HNSW32,SQ8", 10_000_000, 4_194_304),
        # PQ's 256-centroid sub-quantisers want ~10k points even when the lists want fewer.
        ("OPQ64_256,IVF16,PQ64x8", 50_000, 9984),
        ("OPQ64_256,IVF4096,PQ64x8", 1_000_000, 262_144),
    ],
)
def test_training_sample_is_bounded(factory: str, count: int, rows: int) -> None:
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


@pytest.mark.parametrize(
    ("count", "collection", "factory"),
    [
        # A collection small enough to be exact: every segment Flat, whatever its size.
        (MIN_IVF_SEGMENT, EXACT_SEARCH_LIMIT, "Flat"),
        (EXACT_SEARCH_LIMIT, EXACT_SEARCH_LIMIT, "Flat"),
        # A larger collection: one change stays Flat, a merged mid-size segment gets IVF.
        (2_000, 1_000_000, "Flat"),
        (MIN_IVF_SEGMENT - 1, EXACT_SEARCH_LIMIT + 1, "Flat"),
        (MIN_IVF_SEGMENT, EXACT_SEARCH_LIMIT + 1, "IVF128,Flat"),
        (50_000, 1_000_000, "IVF512,Flat"),
        # The whole collection in one segment: what choose_index_spec plans for it.
        (1_000_000, 1_000_000, "IVF4096,Flat"),
    ],
)
def test_a_segment_of_a_large_collection_is_ivf_from_the_mid_size_on(count: int, collection: int, factory: str) -> None:
    spec = choose_segment_index_spec(count, collection, 512)
    assert spec.factory == factory, spec.reason
    assert spec.params == ({} if factory == "Flat" else {"nprobe": 32})


GIB = 2**30


@pytest.mark.parametrize(
    ("largest", "largest_live", "merged", "budget", "factory"),
    [
        # 1M + one change crosses the planner's 1M step: keep IVF4096 (its centroids are reused).
        ("IVF4096,Flat", 1_000_000, 1_000_900, 8 * GIB, "IVF4096,Flat"),
        # Up to twice the largest segment: still kept.
        ("IVF4096,Flat", 1_000_000, 2_000_000, 8 * GIB, "IVF4096,Flat"),
        # One vector more than that: planned anew.
        ("IVF4096,Flat", 1_000_000, 2_000_001, 8 * GIB, "planned"),
        # Kept only within the budget: 1.0009M x 512 Flat codes need ~2 GB.
        ("IVF4096,Flat", 1_000_000, 1_000_900, GIB, "planned"),
        # The largest segment is Flat (a small collection's): nothing to keep.
        ("Flat", 90_000, 110_000, 8 * GIB, "planned"),
    ],
)
def test_a_merge_keeps_the_largest_segments_ivf_within_twice_its_size_and_the_budget(
    largest: str, largest_live: int, merged: int, budget: int, factory: str
) -> None:
    planned = choose_segment_index_spec(merged, merged, 512, max_memory_bytes=budget)
    spec = merged_segment_spec(planned, IndexSpec(largest, {"nprobe": 30}), largest_live, merged, 512, budget)
    assert spec.factory == (planned.factory if factory == "planned" else factory), spec.reason
    if factory != "planned":
        assert spec.params == {"nprobe": 30}
        assert planned.factory != factory  # the case is one where the planner alone would differ
