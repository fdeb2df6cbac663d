"""Which shard holds which segment (image_search/shards.py): deterministic, balanced, stable. Pure, no Ray."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from image_search.segments import read_current_version
from image_search.shards import MAX_SHARDS, assign_segments, shard_loads, version_shard
from image_search.storage import LocalStore
from tests.builds_without_a_model import fake_build
from tests.test_segment_holdings import NO_MERGES, write

segment_lists = st.lists(st.integers(min_value=0, max_value=10_000), min_size=0, max_size=30).map(
    lambda counts: [(f"seg-{i:03d}", count) for i, count in enumerate(counts)]
)


def test_one_shard_holds_everything() -> None:
    assert assign_segments([("a", 5), ("b", 7)], 1) == {"a": 0, "b": 0}
    assert assign_segments([], 3) == {}


def test_largest_first_on_the_least_loaded_shard() -> None:
    segments = [("a", 100), ("b", 60), ("c", 50), ("d", 40), ("e", 10)]
    # a -> 0 (0/0), b -> 1, c -> 1 (60 < 100), d -> 0 (100 < 110), e -> 1 (110 < 140)
    assert assign_segments(segments, 2) == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}
    assert shard_loads(assign_segments(segments, 2), dict(segments), 2) == [140, 120]


def test_ties_are_broken_by_name_then_by_shard_so_every_replica_agrees() -> None:
    segments = [("z", 10), ("y", 10), ("x", 10)]
    assert assign_segments(segments, 2) == {"x": 0, "y": 1, "z": 0}
    assert assign_segments(list(reversed(segments)), 2) == assign_segments(segments, 2)


def test_more_shards_than_segments_leaves_some_empty() -> None:
    placed = assign_segments([("a", 5), ("b", 3)], 4)
    assert placed == {"a": 0, "b": 1}


@pytest.mark.parametrize("shards", [0, MAX_SHARDS + 1])
def test_a_shard_count_out_of_range_is_refused(shards: int) -> None:
    with pytest.raises(ValueError, match="shards"):
        assign_segments([("a", 1)], shards)


def test_duplicate_names_and_negative_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        assign_segments([("a", 1), ("a", 2)], 2)
    with pytest.raises(ValueError, match="negative"):
        assign_segments([("a", -1)], 2)


@settings(max_examples=200, deadline=None)
@given(segments=segment_lists, shards=st.integers(min_value=1, max_value=8))
def test_balanced_within_one_segment_of_the_average(segments: list[tuple[str, int]], shards: int) -> None:
    """LPT: the fullest shard exceeds the average by at most the smallest segment it holds."""
    placed = assign_segments(segments, shards)
    counts = dict(segments)
    loads = shard_loads(placed, counts, shards)
    assert sum(loads) == sum(counts.values())
    fullest = max(range(shards), key=lambda shard: loads[shard])
    held = [counts[name] for name, shard in placed.items() if shard == fullest]
    if held:
        assert loads[fullest] <= sum(loads) / shards + min(held)


@settings(max_examples=200, deadline=None)
@given(segments=segment_lists, shards=st.integers(min_value=2, max_value=8), added=st.integers(0, 10_000))
def test_adding_a_segment_moves_no_larger_segment(segments: list[tuple[str, int]], shards: int, added: int) -> None:
    before = assign_segments(segments, shards)
    after = assign_segments([*segments, ("new", added)], shards)
    for name, count in segments:
        if count > added:
            assert after[name] == before[name], (name, count, added)
    if all(count > added for _, count in segments):  # the smallest of all: nothing moves at all
        assert {name: after[name] for name in before} == before


@settings(max_examples=100, deadline=None)
@given(segments=segment_lists, shards=st.integers(min_value=2, max_value=8), data=st.data())
def test_merging_small_segments_moves_no_larger_segment(
    segments: list[tuple[str, int]], shards: int, data: st.DataObject
) -> None:
    """A compaction: some segments replaced by one holding their vectors; larger ones stay put."""
    if len(segments) < 2:
        return
    merged = data.draw(st.lists(st.sampled_from(segments), min_size=2, max_size=len(segments), unique=True))
    size = sum(count for _, count in merged)
    rest = [segment for segment in segments if segment not in merged]
    before = assign_segments(segments, shards)
    after = assign_segments([*rest, ("merged", size)], shards)
    for name, count in rest:
        if count > size:
            assert after[name] == before[name]


def test_assignment_does_not_depend_on_the_order_segments_are_listed() -> None:
    segments = [("a", 7), ("b", 3), ("c", 7), ("d", 1), ("e", 12)]
    first = assign_segments(segments, 3)
    for order in itertools.permutations(segments):
        assert assign_segments(list(order), 3) == first


def test_a_version_splits_into_disjoint_shards_that_cover_it(tmp_path: Path) -> None:
    images, root = tmp_path / "images", tmp_path / "index"
    images.mkdir()
    for batch, size in enumerate((9, 5, 3, 2)):
        for i in range(size):
            write(images, f"{batch}-{i}.jpg")
        fake_build(images, root, merge_policy=NO_MERGES)
    (images / "0-1.jpg").unlink()  # a deletion in the first segment
    fake_build(images, root, merge_policy=NO_MERGES)
    version = read_current_version(LocalStore(root))
    assert version is not None and len(version.segments) == 4
    parts = [version_shard(version, shard, 2) for shard in range(2)]
    names = [set(part.segment_names) for part in parts]
    assert names[0].isdisjoint(names[1]) and names[0] | names[1] == set(version.segment_names)
    assert sum(part.live_count for part in parts) == version.live_count == 18
    assert all(part.name == version.name and part.next_id == version.next_id for part in parts)
    for part in parts:
        assert set(part.deleted) <= set(part.segment_names)
    assert version_shard(version, 0, 1) is version
    with pytest.raises(ValueError, match="shard 2"):
        version_shard(version, 2, 2)
