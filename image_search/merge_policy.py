"""Which segments to merge: a size-tiered policy (after Lucene's TieredMergePolicy), pure, no I/O.

Every publish of a change adds one small segment. Without merging, a version would hold one segment
per change and every search would pay a per-segment cost for each. The policy keeps the count
logarithmic in the collection's size while rewriting each vector only a few times:

- Sizes are live vectors (stored minus deleted). Segments below `floor_segment_size` count as that
  size, so a stream of tiny segments is merged early instead of lingering.
- Tiers: a segment's tier is floor(log_{tier_factor}(size / floor)). When a tier holds
  `segments_per_tier` segments or more, its smallest `max_merge_at_once` are merged into one (which
  lands a tier up). Each vector is rewritten about once per tier: log_{tier_factor}(n / floor) times.
- Deletions: a segment whose dead share exceeds `max_deleted_fraction` is rewritten (merged with the
  others chosen, or alone), which drops its dead vectors; deletions never cost more than that share.
- A hard bound: a version holds at most `max_segments(total)` = `segments_per_tier` +
  ceil(log_{tier_factor}(total / floor)) segments (4 + 3 = 7 at 1M); beyond it the smallest
  segments are merged until it holds.

Why 4 segments a tier and not Lucene's 10: a search pays every segment, and a small exact segment
costs a FAISS call plus a scan of its vectors (2,000 x 512: ~0.09 ms on one core), while the 1M IVF
segment beside it costs ~1-4 ms at its tuned nprobe. At Lucene's 10 a version of 1M reaches 13
segments and its search ~1.4x one segment's (benchmarks/publish_at_scale.py, 110k: 1.46x); at 4 it
holds at most 7. Simulated (500 changes of 2,000 onto 1M, tests/test_merge_policy.py), 4 also
rewrites each added vector fewer times (4.9 against 6.8): at 10 the tiers fill slower than the hard
bound, which then merges the smallest segments again and again. Mid-size merge results are IVF in a
large collection (index_spec.choose_segment_index_spec), so a tier of them does not cost full scans.

`plan_merges` returns groups of segment names; each group becomes one segment (with the index its
size calls for, chosen by the caller). `full_merge` is `--compact`: everything into one segment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_SEGMENTS_PER_TIER = 4
DEFAULT_MAX_MERGE_AT_ONCE = 10
DEFAULT_FLOOR_SEGMENT_SIZE = 1_000
DEFAULT_TIER_FACTOR = 10
DEFAULT_MAX_DELETED_FRACTION = 0.3


@dataclass(frozen=True)
class SegmentStats:
    name: str
    stored: int  # vectors in the segment, live and dead
    deleted: int

    @property
    def live(self) -> int:
        return self.stored - self.deleted

    @property
    def deleted_fraction(self) -> float:
        return self.deleted / self.stored if self.stored else 0.0


@dataclass(frozen=True)
class MergePolicy:
    segments_per_tier: int = DEFAULT_SEGMENTS_PER_TIER
    max_merge_at_once: int = DEFAULT_MAX_MERGE_AT_ONCE
    floor_segment_size: int = DEFAULT_FLOOR_SEGMENT_SIZE
    tier_factor: int = DEFAULT_TIER_FACTOR
    max_deleted_fraction: float = DEFAULT_MAX_DELETED_FRACTION

    def __post_init__(self) -> None:
        if self.segments_per_tier < 2 or self.max_merge_at_once < 2 or self.tier_factor < 2:
            raise ValueError("segments_per_tier, max_merge_at_once and tier_factor must be >= 2")
        if self.floor_segment_size < 1 or not 0.0 < self.max_deleted_fraction <= 1.0:
            raise ValueError("floor_segment_size must be >= 1 and max_deleted_fraction in (0, 1]")

    def max_segments(self, total_live: int) -> int:
        """The most segments a version of this size keeps: segments_per_tier + tiers above the floor."""
        ratio = max(total_live, self.floor_segment_size) / self.floor_segment_size
        return self.segments_per_tier + math.ceil(math.log(ratio, self.tier_factor) - 1e-9)

    def tier(self, live: int) -> int:
        return int(math.log(max(live, self.floor_segment_size) / self.floor_segment_size, self.tier_factor) + 1e-9)


@dataclass
class _Group:
    names: tuple[str, ...]
    live: int
    dirty: bool  # holds too many dead vectors, or is a merge result: rewritten in any case


def plan_merges(segments: Sequence[SegmentStats], policy: MergePolicy | None = None) -> list[tuple[str, ...]]:
    """Disjoint groups of segment names to merge (each into one new segment); [] when nothing is due."""
    policy = policy or MergePolicy()
    groups = [
        _Group((s.name,), s.live, s.deleted_fraction > policy.max_deleted_fraction and s.deleted > 0) for s in segments
    ]

    def merge(chosen: list[_Group]) -> None:
        for group in chosen:
            groups.remove(group)
        groups.append(_Group(tuple(n for g in chosen for n in g.names), sum(g.live for g in chosen), True))

    # 1. Tiers: a full tier merges its smallest members (lowest tier first; a result may fill the next).
    changed = True
    while changed:
        changed = False
        tiers: dict[int, list[_Group]] = {}
        for group in groups:
            tiers.setdefault(policy.tier(group.live), []).append(group)
        for tier in sorted(tiers):
            members = tiers[tier]
            if len(members) >= policy.segments_per_tier:
                merge(sorted(members, key=lambda g: (g.live, g.names))[: policy.max_merge_at_once])
                changed = True
                break
    # 2. The hard bound on the count: merge the smallest until it holds.
    total = sum(g.live for g in groups)
    while len(groups) > policy.max_segments(total):
        excess = len(groups) - policy.max_segments(total) + 1
        merge(sorted(groups, key=lambda g: (g.live, g.names))[: max(2, min(excess, policy.max_merge_at_once))])
    # 3. What is left dirty (merged, or too many dead vectors) is rewritten; a lone clean segment is not.
    return [g.names for g in groups if g.dirty]


def full_merge(segments: Sequence[SegmentStats]) -> list[tuple[str, ...]]:
    """`--compact`: one segment holding every live vector (also rewrites a single segment with dead ids)."""
    if not segments or (len(segments) == 1 and segments[0].deleted == 0):
        return []
    return [tuple(s.name for s in segments)]
