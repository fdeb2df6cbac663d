"""Baselines that bracket what they judge, for benchmarks on shared, drifting machines.

A ratio against a baseline measured once, minutes away from the phase it judges, measures the
machine's drift as much as our code (these 2-core machines moved 30% within one run). So:

- a baseline is sampled at steady state: warm-up calls until two consecutive samples agree within
  `WARMUP_TOLERANCE` (bounded), then samples until `MIN_SECONDS` have passed or `MIN_CALLS` calls
  were made, whichever comes first;
- it is sampled right before AND right after each measured phase (with the app idle or stopped,
  and the table says which), and the phase's ratio uses that phase's own bracket (the median of
  both sides' samples);
- when the two sides differ by more than `MAX_DRIFT` (15%), the machine changed speed during the
  phase: the verdict is "too noisy, run again", not PASS or MISS.

Reading the spread: `spread` is (max - min) / median of a side's samples. A few percent is a quiet
machine; 10%+ means another job shares the cores, and a bracket whose sides disagree by more than
15% is not a basis for any verdict.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MIN_SECONDS = 8.0
MIN_CALLS = 20
MAX_WARMUP_CALLS = 10
WARMUP_TOLERANCE = 0.05
MAX_DRIFT = 0.15


@dataclass(frozen=True)
class Baseline:
    """Samples of one side of a bracket (higher is better, e.g. img/s; or lower, e.g. seconds)."""

    samples: tuple[float, ...]
    state: str  # "app stopped" | "app idle" | ...

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples))

    @property
    def spread(self) -> float:
        return (max(self.samples) - min(self.samples)) / self.median if self.median else float("inf")

    def describe(self) -> str:
        shown = ", ".join(f"{value:.4g}" for value in self.samples[:12])
        more = f", ... ({len(self.samples)} samples)" if len(self.samples) > 12 else ""
        return f"median {self.median:.4g}, spread {100 * self.spread:.1f}% [{shown}{more}] ({self.state})"


@dataclass(frozen=True)
class Bracket:
    before: Baseline
    after: Baseline

    @property
    def value(self) -> float:
        return float(statistics.median([*self.before.samples, *self.after.samples]))

    @property
    def drift(self) -> float:
        """How far the two sides disagree, relative to the smaller."""
        low, high = sorted((self.before.median, self.after.median))
        return (high - low) / low if low > 0 else float("inf")

    @property
    def noisy(self) -> bool:
        return self.drift > MAX_DRIFT


def steady_samples(
    measure: Callable[[], float],
    state: str,
    min_seconds: float = MIN_SECONDS,
    min_calls: int = MIN_CALLS,
    clock: Callable[[], float] = time.monotonic,
    max_warmup_calls: int = MAX_WARMUP_CALLS,
) -> Baseline:
    """Warm up until two consecutive samples agree, then sample for `min_seconds` or `min_calls`.

    `max_warmup_calls` bounds the warm-up for measurements that are long by themselves (a pass
    over a whole photo folder), whose first call already runs at steady state.
    """
    previous = measure()
    for _ in range(max_warmup_calls):
        current = measure()
        if previous > 0 and abs(current - previous) / previous <= WARMUP_TOLERANCE:
            break
        previous = current
    samples: list[float] = []
    started = clock()
    while len(samples) < min_calls and clock() - started < min_seconds:
        samples.append(measure())
    return Baseline(tuple(samples), state)


def bracketed_ratios(values: Sequence[float], brackets: Sequence[Bracket]) -> list[float]:
    """Each phase's value over its own bracket's baseline."""
    return [value / bracket.value for value, bracket in zip(values, brackets, strict=True)]


def bracketed_verdict(
    name: str, value: float, target: float, brackets: Sequence[Bracket], higher_is_better: bool = True, unit: str = ""
) -> str:
    """PASS/MISS against the target, or "too noisy, run again" if any bracket behind `value` drifted."""
    sign = ">=" if higher_is_better else "<="
    drifts = ", ".join(f"{100 * bracket.drift:.0f}%" for bracket in brackets)
    if any(bracket.noisy for bracket in brackets):
        line = (
            f"NOISY {name}: {value:.3f}{unit} (target {sign} {target:g}{unit}): too noisy, run again "
            f"(bracket drift {drifts}; more than {100 * MAX_DRIFT:.0f}%)"
        )
    else:
        ok = value >= target if higher_is_better else value <= target
        outcome = "PASS" if ok else "MISS"
        line = f"{outcome}  {name}: {value:.3f}{unit} (target {sign} {target:g}{unit}; bracket drift {drifts})"
    print(line, flush=True)
    return line
