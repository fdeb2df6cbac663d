"""The size-tiered merge policy, table-tested: what it merges, and the bound it keeps."""

from __future__ import annotations

import pytest

from image_search.merge_policy import MergePolicy, SegmentStats, full_merge, plan_merges

POLICY = MergePolicy(segments_per_tier=4, max_merge_at_once=4, floor_segment_size=100, tier_factor=10)


def segs(*sizes: int, deleted: dict[int, int] | None = None) -> list[SegmentStats]:
    return [SegmentStats(f"s{i}", size, (deleted or {}).get(i, 0)) for i, size in enumerate(sizes)]


@pytest.mark.parametrize(
    ("segments", "expected"),
    [
        ([], []),
        (segs(5000), []),  # one clean segment: nothing to do
        (segs(5000, 10, 10), []),  # a tier below its quota
        (segs(5000, 10, 20, 30, 40), [("s1", "s2", "s3", "s4")]),  # the floor tier is full: merge it
        (segs(10, 20, 30, 40, 50), [("s0", "s1", "s2", "s3")]),  # the smallest 4 of a full tier
        (segs(5000, 1000, deleted={1: 400}), [("s1",)]),  # 40% dead: rewritten alone
        (segs(5000, 1000, deleted={1: 200}), []),  # 20% dead: below max_deleted_fraction
        (segs(5000, 100, deleted={1: 100}), [("s1",)]),  # all dead: rewritten into nothing
        # 150 is in the floor tier (100..999): four of them fill it
        (segs(150, 150, 150, 150), [("s0", "s1", "s2", "s3")]),
    ],
)
def test_plan_merges(segments: list[SegmentStats], expected: list[tuple[str, ...]]) -> None:
    assert plan_merges(segments, POLICY) == expected


@pytest.mark.parametrize(("total", "bound"), [(0, 4), (100, 4), (101, 5), (1000, 5), (1001, 6), (1_000_000, 8)])
def test_max_segments_is_the_tier_quota_plus_the_log_of_the_size(total: int, bound: int) -> None:
    assert POLICY.max_segments(total) == bound


def test_default_bound_at_a_million_is_four_plus_log() -> None:
    assert MergePolicy().max_segments(1_000_000) == 7


def simulate(policy: MergePolicy, base: int, change: int, publishes: int) -> tuple[int, float, int]:
    """(most segments seen, vectors rewritten per vector added, live total) for a stream of changes."""
    live = {"base": base}
    rewritten = most = 0
    for step in range(publishes):
        live[f"a{step:05d}"] = change
        for group in plan_merges([SegmentStats(n, s, 0) for n, s in live.items()], policy):
            merged = sum(live.pop(name) for name in group)
            rewritten += merged
            live[f"m{step:05d}-{group[0]}"] = merged
        most = max(most, len(live))
        assert len(live) <= policy.max_segments(sum(live.values()))
    return most, rewritten / (change * publishes), sum(live.values())


def test_the_default_keeps_fewer_segments_and_rewrites_less_than_lucenes_ten() -> None:
    """500 changes of 2,000 onto 1M: 4 a tier stays at 8 segments or fewer and rewrites each added
    vector ~5 times; Lucene's 10 reaches the hard bound (14 at 2M) and rewrites ~7 times."""
    most, amplification, total = simulate(MergePolicy(), 1_000_000, 2_000, 500)
    lucene_most, lucene_amplification, _ = simulate(MergePolicy(segments_per_tier=10), 1_000_000, 2_000, 500)
    assert total == 2_000_000
    assert most <= 8 < lucene_most
    assert amplification < 5.5 < lucene_amplification


@pytest.mark.parametrize("additions", [37, 200, 1000])
def test_a_stream_of_small_publishes_stays_under_the_bound(additions: int) -> None:
    """Simulate publishes of 25 vectors each, applying the plan after every one: the count stays bounded."""
    live: dict[str, int] = {}
    for step in range(additions):
        live[f"a{step:05d}"] = 25
        for group in plan_merges([SegmentStats(n, s, 0) for n, s in live.items()], POLICY):
            merged = sum(live.pop(name) for name in group)
            if merged:
                live[f"m{step:05d}-{group[0]}"] = merged
        assert len(live) <= POLICY.max_segments(sum(live.values()))
    assert sum(live.values()) == 25 * additions


def test_full_merge() -> None:
    assert full_merge([]) == []
    assert full_merge(segs(10)) == []
    assert full_merge(segs(10, deleted={0: 1})) == [("s0",)]
    assert full_merge(segs(10, 20)) == [("s0", "s1")]


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError, match=">= 2"):
        MergePolicy(segments_per_tier=1)
    with pytest.raises(ValueError, match="max_deleted_fraction"):
        MergePolicy(max_deleted_fraction=0)
