"""StageTimes without Ray: sums per stage, laps, and the means a benchmark takes between two snapshots."""

from __future__ import annotations

import pytest

from serve_app.stage_times import StageTimes, mean_between, merge


def test_sums_and_counts_per_stage() -> None:
    times = StageTimes()
    times.add("decode", 0.25)
    times.add("decode", 0.75)
    times.add("search", 0.5)
    assert times.snapshot() == {"decode": (1.0, 2), "search": (0.5, 1)}


def test_a_timed_block_counts_also_when_it_raises() -> None:
    times = StageTimes()
    with pytest.raises(ValueError), times.timed("failing"):
        raise ValueError("boom")
    seconds, count = times.snapshot()["failing"]
    assert count == 1 and seconds >= 0


def test_laps_add_the_time_since_the_previous_lap_and_the_total_since_the_start() -> None:
    times = StageTimes()
    lap = times.laps()
    lap("first")
    lap("second")
    lap.total("whole")
    snapshot = times.snapshot()
    assert {stage: count for stage, (_, count) in snapshot.items()} == {"first": 1, "second": 1, "whole": 1}
    assert snapshot["whole"][0] >= snapshot["first"][0] + snapshot["second"][0]


def test_mean_between_two_snapshots_is_per_occurrence_and_skips_stages_that_did_not_occur() -> None:
    before = {"decode": (1.0, 2), "idle": (3.0, 1)}
    after = {"decode": (2.5, 5), "idle": (3.0, 1), "new": (0.5, 2)}
    assert mean_between(before, after) == {"decode": 0.5, "new": 0.25}


def test_merge_sums_replicas() -> None:
    assert merge([{"search": (1.0, 2)}, {"search": (0.5, 1), "other": (1.0, 1)}]) == {
        "search": (1.5, 3),
        "other": (1.0, 1),
    }
