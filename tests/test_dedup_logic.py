"""Near-duplicate collapsing and duplicate groups: the pure logic behind dedup=true and /duplicates."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.queries.dedup import candidate_count, collapse, enough_groups
from serve_app.queries.duplicate_groups import describe_group, group_pairs


def unit(rows: list[list[float]]) -> np.ndarray:
    array = np.asarray(rows, dtype=np.float32)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def near(base: list[float], noise: float, seed: int) -> list[float]:
    vector = np.asarray(base, dtype=np.float32) + noise * np.random.default_rng(seed).standard_normal(len(base))
    return list(vector / np.linalg.norm(vector))


def test_duplicates_join_the_best_kept_match_and_k_distinct_groups_come_back() -> None:
    a, b, c = [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]
    # Best first: a, a', b, a'', c, b'
    vectors = unit([a, near(a, 0.01, 1), b, near(a, 0.01, 2), c, near(b, 0.01, 3)])
    groups = collapse(vectors, k=3, threshold=0.95)
    assert [g.row for g in groups] == [0, 2, 4]
    assert groups[0].duplicates == [1, 3]
    assert groups[1].duplicates == [5]  # after the 3rd group, duplicates still join their group


def test_threshold_separates_similar_from_distinct() -> None:
    vectors = unit([[1.0, 0.0], [0.96, 0.28]])  # cosine 0.96
    assert len(collapse(vectors, k=2, threshold=0.95)) == 1
    assert len(collapse(vectors, k=2, threshold=0.97)) == 2


def test_fewer_groups_than_k_when_candidates_hold_fewer() -> None:
    vectors = unit([[1.0, 0.0], [0.999, 0.01], [0.998, 0.02]])
    groups = collapse(vectors, k=5, threshold=0.95)
    assert len(groups) == 1 and groups[0].duplicates == [1, 2]
    assert not enough_groups(groups, 5, candidates=3, available=100)
    assert enough_groups(groups, 5, candidates=3, available=3)


@pytest.mark.parametrize(
    ("k", "available", "attempt", "expected"), [(5, 1000, 0, 20), (5, 1000, 2, 80), (5, 30, 1, 30)]
)
def test_candidate_count_grows_per_attempt_and_stops_at_the_index_size(
    k: int, available: int, attempt: int, expected: int
) -> None:
    assert candidate_count(k, available, attempt) == expected


def test_a_threshold_outside_cosine_range_is_refused() -> None:
    with pytest.raises(ValueError, match="cosine"):
        collapse(unit([[1.0, 0.0]]), k=1, threshold=1.5)


def test_pairs_form_connected_groups_ordered_by_first_id() -> None:
    assert group_pairs([(7, 3), (3, 9), (1, 2), (5, 5)]) == [[1, 2], [3, 7, 9]]


def test_groups_mark_byte_identical_members() -> None:
    sha = {1: "x", 2: "x", 3: "y", 4: "x"}
    paths = {i: f"p{i}.jpg" for i in sha}
    described = describe_group([1, 2, 3, 4], sha, paths)
    assert [m["identical"] for m in described["members"]] == [True, True, False, True]
    assert described["identical_sets"] == [[1, 2, 4]]
    assert describe_group([1, 3], sha, paths)["identical_sets"] == []
