"""Where a request's time goes inside one replica: seconds summed per named stage.

Each deployment adds what it measured around its own steps (the Ingress: form, decode, the
Embedder and Searcher calls as it awaits them, the results and JSON; the Embedder: its queue, the
hand-off to the model thread and back, the forward pass; the Searcher: its search). A benchmark
reads the totals before and after a phase (`snapshot`) and divides the difference by the count:
the mean per request of each stage, and, subtracted from each other, what the hops between them
cost (benchmarks/served.py prints it for one client).

Always on: an addition per stage per request (two `perf_counter` reads and a dict update, well
under a microsecond), no per-request records, so nothing grows and the normal path pays nothing
measurable. Pure: tested without Ray.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

Snapshot = dict[str, tuple[float, int]]  # stage -> (seconds summed, times counted)


class StageTimes:
    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, stage: str, seconds: float) -> None:
        self._seconds[stage] = self._seconds.get(stage, 0.0) + seconds
        self._counts[stage] = self._counts.get(stage, 0) + 1

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Adds the time the block took (also when it raises: the time was spent)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - started)

    def laps(self) -> Laps:
        """A stopwatch started now: each `lap(stage)` adds the time since the previous lap (or the start)."""
        return Laps(self)

    def snapshot(self) -> Snapshot:
        return {stage: (seconds, self._counts[stage]) for stage, seconds in self._seconds.items()}


class Laps:
    def __init__(self, times: StageTimes) -> None:
        self.times = times
        self.started = self.last = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.times.add(stage, now - self.last)
        self.last = now

    def total(self, stage: str) -> None:
        """Adds the time since the start under `stage`."""
        self.times.add(stage, time.perf_counter() - self.started)


def mean_between(before: Mapping[str, tuple[float, int]], after: Mapping[str, tuple[float, int]]) -> dict[str, float]:
    """Mean seconds per occurrence of each stage between two snapshots (stages that did not occur are left out)."""
    means = {}
    for stage, (seconds, count) in after.items():
        seconds_before, count_before = before.get(stage, (0.0, 0))
        if count > count_before:
            means[stage] = (seconds - seconds_before) / (count - count_before)
    return means


def merge(snapshots: list[Mapping[str, tuple[float, int]]]) -> Snapshot:
    """Several replicas' snapshots as one (sums of sums and counts)."""
    merged: Snapshot = {}
    for snapshot in snapshots:
        for stage, (seconds, count) in snapshot.items():
            total, counted = merged.get(stage, (0.0, 0))
            merged[stage] = (total + seconds, counted + count)
    return merged
