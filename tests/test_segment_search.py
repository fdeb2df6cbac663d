"""Exact search over segments: dead ids filtered inside the scan, per-segment top-k merged by score then id."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from image_search.faiss_index import build_faiss_index
from image_search.index_spec import IndexSpec
from image_search.manifest import ImageRecord
from image_search.segment_search import merge_top_k, search_segments, searchable
from image_search.segments import (
    Version,
    build_segment,
    commit_version,
    new_segment_name,
    open_segment_index,
    read_current_version,
    with_changes,
)
from image_search.storage import LocalStore

DIM = 8


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def brute_force(live: dict[int, np.ndarray], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array(sorted(live), dtype=np.int64)
    matrix = np.stack([live[i] for i in ids]) if len(ids) else np.zeros((0, DIM), np.float32)
    scores = queries @ matrix.T
    top_scores = np.full((len(queries), k), -np.inf, np.float32)
    top_ids = np.full((len(queries), k), -1, np.int64)
    for row in range(len(queries)):
        order = sorted(range(len(ids)), key=lambda j: (-scores[row, j], ids[j]))[:k]
        top_scores[row, : len(order)] = scores[row, order]
        top_ids[row, : len(order)] = ids[order]
    return top_scores, top_ids


def assert_same_top_k(  # type: ignore[no-untyped-def]
    got: np.ndarray, scores: np.ndarray, want: np.ndarray, want_scores: np.ndarray, live, queries: np.ndarray
) -> None:
    """The brute-force top-k, up to the order of near-ties: FAISS and numpy sum products in different
    orders, so two scores within float error may swap. Every other id must match in place; a swapped
    pair must score the same within 1e-5 (checked from the live vectors themselves), and no id repeats."""
    assert (got >= 0).tolist() == (want >= 0).tolist()
    finite = want >= 0
    np.testing.assert_allclose(scores[finite], want_scores[finite], atol=1e-5)
    for row in range(len(queries)):
        ids = [int(i) for i in got[row] if i >= 0]
        assert len(set(ids)) == len(ids) and set(ids) <= set(live)
        true = np.array([float(queries[row] @ live[i]) for i in ids], np.float32)
        np.testing.assert_allclose(true, want_scores[row, : len(ids)], atol=1e-5)
        for position, (image_id, wanted) in enumerate(zip(ids, want[row].tolist(), strict=False)):
            if image_id != wanted:
                assert abs(float(want_scores[row, position]) - float(queries[row] @ live[wanted])) <= 1e-5
                assert abs(true[position] - want_scores[row, position]) <= 1e-5


def test_dead_ids_are_skipped_inside_the_scan_so_k_results_still_come_back() -> None:
    rng = np.random.default_rng(0)
    vectors = unit(rng, 20)
    index = build_faiss_index(vectors, IndexSpec("Flat"), np.arange(100, 120))
    dead = list(range(100, 115))  # 15 of 20 dead: a post-filter of the top 5 would return nothing
    _, ids = search_segments([searchable("s", index, dead)], vectors[:3], 5)
    assert set(ids.ravel().tolist()) <= set(range(115, 120))
    assert (ids >= 0).all()  # k live results, not fewer


def test_ivf_segment_keeps_its_nprobe_with_a_selector() -> None:
    rng = np.random.default_rng(1)
    vectors = unit(rng, 2000)
    index = build_faiss_index(vectors, IndexSpec("IVF16,Flat", {"nprobe": 16}), np.arange(2000))
    segment = searchable("s", index, [0, 1, 2])
    params = segment.search_parameters()
    assert isinstance(params, faiss.SearchParametersIVF) and params.nprobe == 16
    _, ids = search_segments([segment], vectors[:10], 5)
    assert not set(ids.ravel().tolist()) & {0, 1, 2}
    assert ids[5:, 0].tolist() == list(range(5, 10))  # nprobe = nlist: exact, each finds itself


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_dead_rows_skipped_by_position_answer_as_the_id_selector_does(factory: str) -> None:
    # search_segments filters the inner index by a bitmap of live positions (no id translation per
    # scanned row); it must answer exactly what the IDMap2 with the id selector answers.
    rng = np.random.default_rng(3)
    vectors = unit(rng, 3000)
    ids = rng.permutation(np.arange(10_000, 13_000)).astype(np.int64)  # ids unrelated to positions
    index = build_faiss_index(vectors, IndexSpec(factory, {"nprobe": 4} if "IVF" in factory else {}), ids)
    dead = rng.choice(ids, 700, replace=False)
    segment = searchable("s", index, dead)
    assert segment.live_rows is not None
    queries = unit(rng, 40)
    scores, found = search_segments([segment], queries, 10)
    want_scores, want = index.search(queries, 10, params=segment.search_parameters())
    np.testing.assert_array_equal(found, want)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)
    assert not set(found.ravel().tolist()) & set(dead.tolist())


def test_merge_breaks_ties_by_lower_id_and_pads_missing() -> None:
    part_a = (np.array([[0.9, 0.5]], np.float32), np.array([[7, 3]], np.int64))
    part_b = (np.array([[0.9, -1.0]], np.float32), np.array([[2, -1]], np.int64))
    scores, ids = merge_top_k([part_a, part_b], 4, 1)
    assert ids.tolist() == [[2, 7, 3, -1]]
    assert scores[0, :3].tolist() == [np.float32(0.9), np.float32(0.9), np.float32(0.5)]
    assert scores[0, 3] == -np.inf
    empty_scores, empty_ids = merge_top_k([], 2, 3)
    assert empty_ids.shape == (3, 2) and (empty_ids == -1).all() and np.isneginf(empty_scores).all()


OPS = st.lists(
    st.tuples(st.sampled_from(["add", "edit", "remove"]), st.integers(1, 6), st.integers(0, 2**31)),
    min_size=1,
    max_size=8,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_random_changes_search_like_brute_force_over_the_live_vectors(tmp_path_factory, ops) -> None:  # type: ignore[no-untyped-def]
    """Each op publishes one segment plus deletions; after each publish the segment search equals brute force."""
    store = LocalStore(tmp_path_factory.mktemp("index"))
    cache = Path(tmp_path_factory.mktemp("cache"))
    live: dict[int, np.ndarray] = {}
    where: dict[int, str] = {}
    version: Version | None = None
    next_id = 0
    queries = unit(np.random.default_rng(99), 4)
    for step, (op, amount, seed) in enumerate(ops):
        rng = np.random.default_rng(seed)
        ids: list[int] = []
        delete: dict[str, list[int]] = {}
        if op == "add" or not live:
            ids = list(range(next_id, next_id + amount))
            next_id += amount
        else:
            chosen = rng.choice(sorted(live), size=min(amount, len(live)), replace=False).tolist()
            for image_id in chosen:
                delete.setdefault(where[image_id], []).append(image_id)
                del live[image_id]
            if op == "edit":
                ids = chosen  # same ids, new vectors, in a new segment
        added = []
        if ids:
            vectors = unit(rng, len(ids))
            records = [ImageRecord(i, f"k{i}.jpg", 1, "00") for i in ids]
            segment = build_segment(store, np.array(ids), vectors, records, DIM, name=new_segment_name())
            added.append(segment)
            for i, vector in zip(ids, vectors, strict=True):
                live[i] = vector
                where[i] = segment.name
        name = f"v{step:03d}"
        if version is None:
            version = Version(name, "m", "f", DIM, {}, "fp32", "/src", tuple(added), {}, next_id)
        else:
            version = with_changes(version, name=name, add=added, delete=delete, next_id=next_id)
        commit_version(store, version)
        published = read_current_version(store)
        assert published == version and published.live_count == len(live)
        segments = [
            searchable(s.name, open_segment_index(store, s, cache), published.deleted_ids(s.name))
            for s in published.segments
        ]
        k = 5
        scores, got = search_segments(segments, queries, k)
        want_scores, want = brute_force(live, queries, k)
        assert_same_top_k(got, scores, want, want_scores, live, queries)
