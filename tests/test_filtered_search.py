"""Filtered search inside the scan (image_search/filtered_search.py) against brute force, without Ray;
the scan planner's table; the query-string filters and folder counts (serve_app/queries/filters.py);
the de-duplicated search loop (serve_app/queries/dedup_search.py)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from starlette.datastructures import QueryParams

from image_search.duplicate_pairs import duplicate_pairs
from image_search.faiss_index import build_faiss_index
from image_search.filtered_search import (
    EXACT_SCAN_MAX_ROWS,
    IdFilter,
    ScanPlan,
    SegmentRows,
    plan_scan,
    raise_nprobe,
    search_filtered,
    stored_vectors,
)
from image_search.index_spec import IndexSpec
from image_search.manifest import ImageRecord
from image_search.segment_search import searchable
from serve_app.queries.dedup_search import dedup_search
from serve_app.queries.filters import InvalidFilter, below_min_score, folders, ids_with_prefix, parse_filters

DIM = 8


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def brute_force(ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Top-k ids per query: score desc, id asc (the service's order)."""
    scores = queries @ vectors.T
    out = []
    for row in scores:
        order = np.lexsort((ids, -row))[:k]
        out.append(ids[order])
    return np.asarray(out)


@pytest.mark.parametrize(
    ("matching", "total", "nprobe", "nlist", "want"),
    [
        (0, 100, None, None, ScanPlan("skip")),
        (5, 100, None, None, ScanPlan("exact")),
        (EXACT_SCAN_MAX_ROWS, 10**6, 8, 1024, ScanPlan("exact")),  # few: raw vectors, exact
        (EXACT_SCAN_MAX_ROWS + 1, 10**6, None, None, ScanPlan("index")),  # Flat: the index with a selector
        (100_000, 1_000_000, 8, 1024, ScanPlan("index", 80)),  # 10% match: nprobe x 10
        (500_000, 1_000_000, 8, 1024, ScanPlan("index", 16)),
        (30_000, 1_000_000, 8, 1024, ScanPlan("index", 267)),  # 3%: ceil(8 / 0.03)
        (30_000, 1_000_000, 64, 1024, ScanPlan("index", 1024)),  # capped at nlist
        (1_000_000, 1_000_000, 8, 1024, ScanPlan("index", 8)),  # everything matches: as unfiltered
    ],
)
def test_the_planner_scans_few_matches_exactly_and_raises_nprobe_by_the_selectivity(
    matching: int, total: int, nprobe: int | None, nlist: int | None, want: ScanPlan
) -> None:
    assert plan_scan(matching, total, nprobe, nlist) == want


def test_raise_nprobe_never_goes_below_the_tuned_value() -> None:
    assert raise_nprobe(8, 1024, 10, 10) == 8
    assert raise_nprobe(8, 4, 1, 1000) == 4


def test_id_filter_is_a_bitmap_and_without_removes_one_id() -> None:
    f = IdFilter.of([0, 3, 9, 17], 20)
    assert f.count == 4 and len(f.bitmap) == 3
    assert f.allows(np.array([0, 1, 3, 9, 17, 19, 20, -1, 1000])).tolist() == [
        True, False, True, True, True, False, False, False, False
    ]  # fmt: skip
    g = f.without(9)
    assert g.count == 3 and not g.allows(np.array([9]))[0] and f.allows(np.array([9]))[0]
    assert f.without(5) is f
    with pytest.raises(ValueError):
        IdFilter.of([20], 20)


def two_segments(spec: IndexSpec, copies: tuple[tuple[int, int], ...] = ()) -> tuple[list, list, dict[int, np.ndarray]]:
    """Two segments (ids 0..599 and 600..999, id 10..19 re-added in the second: dead in the first).

    `copies`: (second-segment id, first-segment id) pairs given the same vector.
    """
    rng = np.random.default_rng(5)
    first_ids = np.arange(600, dtype=np.int64)
    second_ids = np.concatenate([np.arange(600, 1000), np.arange(10, 20)]).astype(np.int64)
    first, second = unit(rng, len(first_ids)), unit(rng, len(second_ids))
    for target, source in copies:
        second[int(np.flatnonzero(second_ids == target)[0])] = first[source]
    segments, rows = [], []
    for name, ids, vectors, dead in (
        ("a", first_ids, first, np.arange(10, 20)),
        ("b", second_ids, second, np.asarray([700, 701])),
    ):
        index = build_faiss_index(vectors, spec, ids)
        if "IVF" in spec.factory:
            faiss.extract_index_ivf(index).nprobe = 2
        segments.append(searchable(name, index, dead))
        rows.append(SegmentRows.of(faiss.vector_to_array(faiss.downcast_index(index).id_map), vectors))
    live = {int(i): v for i, v in zip(first_ids, first, strict=True) if not 10 <= i < 20}
    live.update({int(i): v for i, v in zip(second_ids, second, strict=True) if i not in (700, 701)})
    return segments, rows, live


@pytest.mark.parametrize("exact_max", [0, EXACT_SCAN_MAX_ROWS])  # the index path, then the raw-vector path
@pytest.mark.parametrize("allowed_count", [3, 50, 400])  # fewer than k, and more
def test_filtered_search_equals_brute_force_over_the_matching_live_subset(exact_max: int, allowed_count: int) -> None:
    segments, rows, live = two_segments(IndexSpec("Flat"))
    rng = np.random.default_rng(allowed_count)
    candidates = np.asarray([*sorted(live), 10, 11, 700], dtype=np.int64)  # 10, 11 live (second copy); 700 dead
    allowed = np.unique(rng.choice(candidates, size=allowed_count, replace=False))
    allowed = np.unique(np.concatenate([allowed, [12, 700]]))
    queries = unit(rng, 4)
    k = 10
    scores, ids = search_filtered(segments, rows, queries, k, IdFilter.of(allowed, 1000), exact_max)
    subset = np.asarray([i for i in allowed if int(i) in live], dtype=np.int64)
    want = brute_force(subset, np.stack([live[int(i)] for i in subset]), queries, k)
    expected_len = min(k, len(subset))
    assert (ids[:, :expected_len] == want).all()
    assert (ids[:, expected_len:] == -1).all()
    assert 700 not in ids  # dead in its segment, though allowed
    np.testing.assert_allclose(
        scores[:, :expected_len], [[queries[q] @ live[int(i)] for i in want[q]] for q in range(4)], atol=1e-5
    )


def test_a_filtered_ivf_search_returns_k_and_high_recall_at_low_selectivity() -> None:
    segments, rows, live = two_segments(IndexSpec("IVF16,Flat"))
    rng = np.random.default_rng(9)
    allowed = np.asarray(sorted(rng.choice(sorted(live), size=40, replace=False)), dtype=np.int64)
    queries = unit(rng, 8)
    _, ids = search_filtered(segments, rows, queries, 10, IdFilter.of(allowed, 1000), exact_max=0)
    want = brute_force(allowed, np.stack([live[int(i)] for i in allowed]), queries, 10)
    assert (ids >= 0).all()  # k came back: never a post-filter
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), want.tolist(), strict=True)])
    assert recall >= 0.95


def test_stored_vectors_finds_the_live_copy_of_an_edited_id() -> None:
    segments, rows, live = two_segments(IndexSpec("Flat"))
    found, vectors = stored_vectors(segments, rows, np.asarray([12, 700, 999, 5000]), DIM)
    assert found.tolist() == [True, False, True, False]
    np.testing.assert_array_equal(vectors[0], live[12])  # the second segment's vector, not the dead first one
    np.testing.assert_array_equal(vectors[2], live[999])


def params(pairs: list[tuple[str, str]]) -> QueryParams:
    return QueryParams(pairs)


def test_filters_parse_repeated_prefixes_min_score_and_dedup() -> None:
    got = parse_filters(params([("prefix", "b/"), ("prefix", "a/"), ("prefix", "b/"), ("min_score", "0.25")]))
    assert got.prefixes == ("a/", "b/") and got.min_score == 0.25 and not got.dedup
    assert parse_filters(params([("dedup", "true")])).dedup
    assert parse_filters(params([])).prefixes == ()


@pytest.mark.parametrize(
    "bad",
    [
        [("prefix", "")],
        [("prefix", "x" * 1025)],
        [("prefix", str(i)) for i in range(17)],
        [("min_score", "high")],
        [("min_score", "nan")],
        [("min_score", "1.5")],
        [("min_score", "-inf")],
        [("dedup", "maybe")],
    ],
)
def test_bad_filters_are_422(bad: list[tuple[str, str]]) -> None:
    with pytest.raises(InvalidFilter) as caught:
        parse_filters(params(bad))
    assert caught.value.status == 422


def record(image_id: int, key: str) -> ImageRecord:
    return ImageRecord(id=image_id, key=key, sha256="0" * 64, size=1, mtime_ns=0)


def test_prefixes_and_folders_come_from_the_keys() -> None:
    records = [record(0, "a/x.jpg"), record(1, "a/b/y.jpg"), record(2, "ab.jpg"), record(3, "c/z.png")]
    assert ids_with_prefix(records, ("a/",)).tolist() == [0, 1]
    assert ids_with_prefix(records, ("a", "c/")).tolist() == [0, 1, 2, 3]
    assert folders(records) == ([{"prefix": "a/", "count": 2}, {"prefix": "c/", "count": 1}], 1)


def test_min_score_drops_matches_below_it() -> None:
    scores = np.asarray([[0.9, 0.5, 0.1]], dtype=np.float32)
    ids = np.asarray([[4, 5, 6]])
    assert below_min_score(scores, ids, 0.5).tolist() == [[4, 5, -1]]
    assert below_min_score(scores, ids, None) is ids


def test_dedup_search_asks_for_more_candidates_until_k_groups() -> None:
    rng = np.random.default_rng(2)
    base = unit(rng, 3)
    # 3 distinct photos, the first with 40 near-copies: 4k = 8 candidates hold only 1-2 groups.
    copies = base[0] + 0.001 * rng.normal(size=(40, DIM)).astype(np.float32)
    vectors = np.concatenate([copies / np.linalg.norm(copies, axis=1, keepdims=True), base[1:]])
    query = base[0][None, :]
    ids = np.arange(len(vectors))
    asked = []

    def search(q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        asked.append(n)
        top = brute_force(ids, vectors, q, n)
        return (q @ vectors[top[0]].T), top

    row = dedup_search(search, lambda wanted: vectors[wanted], query, 2, len(vectors), 0.95)
    assert len(row.ids) == 2 and asked == [8, 16, 32, 42]
    assert sorted([int(row.ids[0]), *row.duplicates[0]]) == list(range(40))  # every copy in the first group
    assert row.duplicates[1] == []


def test_duplicate_pairs_are_every_live_pair_at_or_above_the_threshold_once() -> None:
    # Copies across segments: 650 (second) of 3 (first), and 12's live copy (second) of 5.
    segments, rows, live = two_segments(IndexSpec("Flat"), ((650, 3), (12, 5)))
    found = duplicate_pairs(segments, rows, 0.99)
    ids = np.asarray(sorted(live))
    matrix = np.stack([live[int(i)] for i in ids])
    sims = matrix @ matrix.T
    want = {(int(ids[a]), int(ids[b])) for a, b in zip(*np.nonzero(sims >= 0.99), strict=True) if ids[a] < ids[b]}
    assert found.complete
    assert {tuple(pair) for pair in found.pairs.tolist()} == want
    assert {(3, 650), (5, 12)} <= want


def test_coarse_duplicate_pairs_are_real_pairs_and_find_the_copies_across_segments() -> None:
    # Above exact_max_rows the pairs come from one temporary IVF-SQ8 over the live vectors: every pair
    # it returns must be real at the threshold (checked on the stored vectors), dead ids never appear,
    # and copies (same list, score 1) are always found.
    copies = ((650, 3), (12, 5), (800, 400), (900, 401))
    segments, rows, live = two_segments(IndexSpec("Flat"), copies)
    found = duplicate_pairs(segments, rows, 0.95, exact_max_rows=100)
    exact = duplicate_pairs(segments, rows, 0.95)
    got = {tuple(pair) for pair in found.pairs.tolist()}
    want = {tuple(pair) for pair in exact.pairs.tolist()}
    assert found.complete
    assert got <= want
    assert {(3, 650), (5, 12), (400, 800), (401, 900)} <= got
    assert all(live.get(a) is not None and live.get(b) is not None for a, b in got)
    assert len(got) >= 0.9 * len(want)


def test_duplicate_pairs_stop_at_the_pair_bound_and_say_so() -> None:
    segments, rows, _ = two_segments(IndexSpec("Flat"))
    for exact_max_rows in (0, 10_000):  # the coarse index, then the segments' own
        found = duplicate_pairs(segments, rows, -1.0, max_pairs=50, exact_max_rows=exact_max_rows)
        assert not found.complete and len(found.pairs) == 50


def test_attach_duplicates_skips_entries_with_errors() -> None:
    from serve_app.queries.filters import attach_duplicates

    entries: list[dict[str, object]] = [
        {"filename": "bad.jpg", "error": {"code": "corrupt_image"}},
        {"filename": "a.jpg", "matches": [{"id": 4}, {"id": 7}]},
    ]
    attach_duplicates(entries, [{4: [9, 11], 7: []}])
    assert entries[1]["matches"] == [{"id": 4, "duplicates": [9, 11]}, {"id": 7, "duplicates": []}]
    assert "matches" not in entries[0]
