"""Bracketed baselines of the benchmarks: steady-state sampling, drift, and the verdict they allow."""

from __future__ import annotations

import itertools

import pytest

from benchmarks.bracket import Baseline, Bracket, bracketed_ratios, bracketed_verdict, steady_samples


def test_warm_up_runs_until_two_samples_agree_then_sampling_stops_at_min_calls() -> None:
    values = iter([5.0, 8.0, 9.6, 10.0, *([10.0] * 100)])  # slow first calls, then steady
    calls = []

    def measure() -> float:
        calls.append(1)
        return next(values)

    ticks = itertools.count()
    baseline = steady_samples(measure, "app idle", min_seconds=1e9, min_calls=20, clock=lambda: float(next(ticks)))
    assert len(baseline.samples) == 20
    assert baseline.samples[0] == 10.0  # the warm-up samples are not in it
    assert len(calls) == 4 + 20


def test_sampling_stops_at_min_seconds_when_calls_are_slow() -> None:
    ticks = itertools.count(step=3)
    baseline = steady_samples(
        lambda: 1.0, "app stopped", min_seconds=8.0, min_calls=20, clock=lambda: float(next(ticks))
    )
    assert len(baseline.samples) == 2  # started at 0 s; checks at 3 and 6 s sample, the one at 9 s stops


def test_a_bracket_whose_sides_disagree_by_more_than_15_percent_is_noisy(capsys: pytest.CaptureFixture[str]) -> None:
    quiet = Bracket(Baseline((10.0, 10.2), "app idle"), Baseline((10.5, 10.9), "app idle"))
    drifted = Bracket(Baseline((10.0, 10.0), "app idle"), Baseline((12.0, 12.0), "app idle"))
    assert not quiet.noisy and drifted.noisy
    assert bracketed_verdict("ratio", 0.9, 0.8, [quiet]).startswith("PASS")
    assert bracketed_verdict("ratio", 0.7, 0.8, [quiet]).startswith("MISS")
    assert "too noisy, run again" in bracketed_verdict("ratio", 0.9, 0.8, [quiet, drifted])


def test_each_phase_is_judged_against_its_own_bracket() -> None:
    slow = Bracket(Baseline((10.0,), "app idle"), Baseline((10.0,), "app idle"))
    fast = Bracket(Baseline((20.0,), "app idle"), Baseline((20.0,), "app idle"))
    assert bracketed_ratios([8.0, 16.0], [slow, fast]) == [0.8, 0.8]


def test_spread_is_range_over_median() -> None:
    assert Baseline((9.0, 10.0, 11.0), "x").spread == pytest.approx(0.2)
    assert "spread 20.0%" in Baseline((9.0, 10.0, 11.0), "app stopped").describe()


def test_a_bounded_warm_up_stops_after_max_warmup_calls_even_when_samples_disagree() -> None:
    values = itertools.cycle([1.0, 2.0])  # never two in a row within 5%
    calls = []

    def measure() -> float:
        calls.append(1)
        return next(values)

    ticks = itertools.count()
    baseline = steady_samples(
        measure, "no app", min_seconds=1e9, min_calls=3, clock=lambda: float(next(ticks)), max_warmup_calls=1
    )
    assert len(calls) == 1 + 1 + 3  # the first call, one warm-up call, three samples
    assert len(baseline.samples) == 3
