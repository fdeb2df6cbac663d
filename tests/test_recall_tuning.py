"""Recall tuning: the smallest nprobe / efSearch meeting recall@10 on the collection's own vectors."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from benchmarks.clip_like_data import ClipLikeMixture, ClipLikeSampler
from image_search.faiss_index import build_faiss_index
from image_search.index_spec import IndexSpec
from image_search.recall_tuning import (
    LADDER_RATIO,
    PLATEAU_GAIN,
    HeldOutSample,
    IvfFlatCurve,
    TuningResult,
    is_ivf_flat,
    recall_lower_bound,
    set_knob,
    smallest_meeting,
    tune_recall,
    with_tuned_params,
)


@pytest.fixture(scope="module")
def clustered() -> np.ndarray:
    """20k x 64 CLIP-like vectors: 50 Zipf-sized topics, cosine 0.7-0.9 to their centre."""
    vectors, _ = ClipLikeSampler(ClipLikeMixture(dim=64, clusters=50, seed=3)).draw(20_000, seed=4)
    return vectors


def test_ivf_tuning_reaches_the_target_with_the_smallest_nprobe(clustered: np.ndarray) -> None:
    ids = np.arange(100, 100 + len(clustered), dtype=np.int64) * 3  # stable ids, not positions
    index = build_faiss_index(clustered, IndexSpec("IVF256,Flat", {"nprobe": 1}), ids)
    result = tune_recall(index, clustered, ids, target=0.95, sample_queries=300)
    assert (result.param, result.met, result.k) == ("nprobe", True, 10)
    assert result.recall > result.lower_bound >= 0.95  # met with the confidence margin, not just on the sample
    assert result.value is not None and 1 < result.value < 256
    # The value just below it misses (measured during the search: it is the smallest).
    assert recall_lower_bound(result.tried[result.value - 1], 10 * 300) < 0.95
    assert faiss.extract_index_ivf(index).nprobe == result.value
    assert result.p99_ms >= result.p50_ms > 0


def test_the_ivf_flat_curve_is_what_real_searches_find(clustered: np.ndarray) -> None:
    """The curve from centroid ranks equals the exact-id recall of a real IVF-Flat search at each nprobe."""
    index = build_faiss_index(clustered, IndexSpec("IVF256,Flat"))
    assert is_ivf_flat(index) and not is_ivf_flat(build_faiss_index(clustered[:5000], IndexSpec("IVF16,SQ8")))
    sample = HeldOutSample(clustered, np.arange(len(clustered)), k=10, count=200)
    curve = IvfFlatCurve(index, sample)
    assert curve.recall(0) == 0.0 and curve.recall(256) == 1.0
    for nprobe in (1, 3, 17, 64):
        set_knob(index, "nprobe", nprobe)
        _, found = index.search(sample.queries, 11)
        pairs = zip(found, sample.neighbour_rows, strict=True)
        exact_hits = sum(len(set(row.tolist()) & set(truth.tolist())) for row, truth in pairs)
        assert curve.recall(nprobe) == exact_hits / (10 * 200)
        assert sample.recall(found) >= curve.recall(nprobe)  # the tie-aware measure is never below it


def test_this_data_tells_nprobe_settings_apart(clustered: np.ndarray) -> None:
    index = build_faiss_index(clustered, IndexSpec("IVF256,Flat"))
    sample = HeldOutSample(clustered, np.arange(len(clustered)), k=10, count=300)
    recalls = {}
    for nprobe in (1, 8, 64):
        set_knob(index, "nprobe", nprobe)
        _, found = index.search(sample.queries, 11)
        recalls[nprobe] = sample.recall(found)
    assert recalls[1] + 0.05 < recalls[8] < recalls[64], recalls


def test_exact_index_needs_no_tuning(clustered: np.ndarray) -> None:
    index = build_faiss_index(clustered[:5000], IndexSpec("Flat"))
    result = tune_recall(index, clustered[:5000], target=0.95, sample_queries=200)
    assert (result.param, result.value, result.recall, result.met, result.params()) == (None, None, 1.0, True, {})


def test_hnsw_tuning_sets_the_smallest_ef_search(clustered: np.ndarray) -> None:
    vectors = clustered[:10_000]
    index = build_faiss_index(vectors, IndexSpec("HNSW32"))
    result = tune_recall(index, vectors, target=0.995, sample_queries=300)
    assert (result.param, result.met) == ("ef_search", True)
    assert result.lower_bound >= 0.995 and result.value is not None
    # The ladder stops within LADDER_RATIO: the largest value tried below the chosen one missed, close to it.
    below = max((value for value in result.tried if value < result.value), default=None)
    assert result.value == 10 or below is not None  # starts at k
    if below is not None:
        assert recall_lower_bound(result.tried[below], 10 * 300) < 0.995
        assert result.value <= max(LADDER_RATIO * below, below + 1)
    assert faiss.downcast_index(index.index).hnsw.efSearch == result.value


def test_unreachable_target_is_flagged_not_hidden(clustered: np.ndarray) -> None:
    """A 4-byte PQ code (8 x 4 bits) cannot reach recall 0.99 at any nprobe: the best is returned, marked unmet."""
    vectors = clustered[:10_000]  # PQ's sub-quantisers train on ~10k points
    index = build_faiss_index(vectors, IndexSpec("IVF16,PQ8x4"))
    result = tune_recall(index, vectors, target=0.99, sample_queries=200)
    assert (result.param, result.met) == ("nprobe", False)
    assert result.lower_bound < result.recall < 0.99
    assert result.recall == max(result.tried.values())
    # It gave up at nlist, or once two doublings in a row gained (almost) nothing: the code's ceiling.
    tried = sorted(result.tried)
    recalls = [result.tried[value] for value in tried]
    assert tried[-1] == 16 or max(recalls[-1] - recalls[-2], recalls[-2] - recalls[-3]) < PLATEAU_GAIN + 0.01


def test_a_query_finding_itself_is_not_a_hit() -> None:
    vectors = np.eye(20, dtype=np.float32)[:, :16]
    vectors[16:] = vectors[:4] * 0.5 + 0.5 / 4
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sample = HeldOutSample(vectors, np.arange(20), k=2, count=20)
    only_itself = np.stack([sample.query_ids, np.full(20, -1), np.full(20, -1)], axis=1)
    assert sample.recall(only_itself) == 0.0
    _, exact = faiss.knn(sample.queries, vectors, 3, metric=faiss.METRIC_INNER_PRODUCT)
    assert sample.recall(exact) == 1.0


def test_duplicates_count_whichever_copy_is_returned() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((50, 8)).astype(np.float32)
    vectors = np.concatenate([base, base, base])  # every vector three times
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sample = HeldOutSample(vectors, np.arange(150), k=2, count=30)
    # Answer each query with the *other* copies in reverse order of what an exact scan might pick.
    found = np.array([[q, (q + 100) % 150, (q + 50) % 150] for q in sample.query_ids.tolist()])
    assert sample.recall(found) == 1.0


def test_the_margin_shrinks_with_more_queries() -> None:
    assert recall_lower_bound(1.0, 100) == 1.0
    assert recall_lower_bound(0.95, 10 * 100) < recall_lower_bound(0.95, 10 * 1000) < 0.95


@pytest.mark.parametrize(
    ("threshold", "high", "expected"),
    [(1, 100, (1, True)), (37, 100, (37, True)), (64, 64, (64, True)), (65, 64, (64, False)), (100, 100, (100, True))],
)
def test_smallest_meeting_doubles_then_bisects(threshold: int, high: int, expected: tuple[int, bool]) -> None:
    calls: list[int] = []

    def step(value: int) -> float:
        calls.append(value)
        return 1.0 if value >= threshold else 0.0

    assert smallest_meeting(step, 1, high, 0.5) == expected
    assert len(calls) <= 2 * int(np.log2(high)) + 2


def test_smallest_meeting_stops_within_the_ratio_and_at_a_plateau() -> None:
    calls: list[int] = []

    def rising(value: int) -> float:
        calls.append(value)
        return 1.0 if value >= 300 else 0.0

    value, met = smallest_meeting(rising, 1, 4096, 0.5, ratio=1.1)
    assert met and 300 <= value <= 1.1 * max(v for v in calls if v < 300)
    assert len(calls) < 2 * int(np.log2(4096))

    def ceiling(value: int) -> float:  # a lossy code: flat at 0.7 from 8 on
        return min(0.7, 0.1 * value)

    value, met = smallest_meeting(ceiling, 1, 4096, 0.9, plateau=0.002)
    assert (value, met) == (32, False)  # 8 -> 16 -> 32 gained nothing twice: stop, not 4096


def test_result_round_trips_through_json(clustered: np.ndarray) -> None:
    index = build_faiss_index(clustered[:3000], IndexSpec("IVF16,Flat"))
    result = tune_recall(index, clustered[:3000], target=0.9, sample_queries=100)
    again = TuningResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result
    assert again.params() == {"nprobe": result.value}


def test_tuned_params_replace_the_starting_knob(clustered: np.ndarray) -> None:
    spec = IndexSpec("IVF16,Flat", {"nprobe": 32}, reason="planned")
    index = build_faiss_index(clustered[:3000], spec)
    result = tune_recall(index, clustered[:3000], target=0.9, sample_queries=100)
    tuned = with_tuned_params(spec, result)
    assert (tuned.factory, tuned.params, tuned.reason) == ("IVF16,Flat", {"nprobe": result.value}, "planned")
    assert (
        with_tuned_params(
            IndexSpec("Flat"),
            tune_recall(
                build_faiss_index(clustered[:500], IndexSpec("Flat")), clustered[:500], target=0.9, sample_queries=50
            ),
        ).params
        == {}
    )


def test_an_hnsw_coarse_quantizer_searches_at_least_nprobe_lists(clustered: np.ndarray) -> None:
    """With FAISS's default quantizer efSearch (16) recall plateaus below what nprobe should give."""
    index = build_faiss_index(clustered, IndexSpec("IVF256_HNSW32,Flat"))
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    set_knob(index, "nprobe", 128)
    assert quantizer.hnsw.efSearch >= 128
    sample = HeldOutSample(clustered, np.arange(len(clustered)), k=10, count=200)
    _, found = index.search(sample.queries, 11)
    assert sample.recall(found) >= 0.99  # half the lists probed, and the quantizer finds them
