"""Which shard holds which segment of a version: a pure function of the version's segment list.

With `searcher.shards: N` a version's segments are split across N shard groups (each a Searcher
deployment with its own replicas, serve_app/app.py); every shard computes its own share from the
version file alone, so no shard, Ingress or restart needs to remember an earlier assignment.

The rule is "largest first" (LPT): segments sorted by vector count, largest first (ties by name),
each placed on the shard holding the fewest vectors so far (ties: the lowest shard). That is

- deterministic: the same segment list gives the same assignment on every replica;
- balanced by vector count: no shard holds more than the average plus the smallest segment it
  was given after the others (at most 4/3 of the best possible split);
- stable: where a segment goes depends only on the segments at least as large as it. A new segment
  smaller than every other moves nothing, and adding or removing segments of size s (a write's small
  segment, a compaction of small segments into a larger one) never moves a segment larger than s,
  so the big segments, the ones that cost a load, stay on the shard that holds them.

Counts are the segments' stored vectors (live and dead): what a shard keeps in memory, and a
segment never changes once written, so its count, and so its place, do not move with deletions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no FAISS import for serve_app/config.py, which reads MAX_SHARDS
    from image_search.segments import SegmentInfo, Version

MAX_SHARDS = 64


def assign_segments(segments: Sequence[tuple[str, int]], shards: int) -> dict[str, int]:
    """(name, vector count) per segment -> the shard (0..shards-1) of each (see the module docstring)."""
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be between 1 and {MAX_SHARDS}, got {shards}")
    names = [name for name, _ in segments]
    if len(set(names)) != len(names):
        raise ValueError("segment names must be unique")
    loads = [0] * shards
    placed: dict[str, int] = {}
    for name, count in sorted(segments, key=lambda segment: (-segment[1], segment[0])):
        if count < 0:
            raise ValueError(f"segment {name} has a negative count")
        shard = min(range(shards), key=lambda i: (loads[i], i))
        placed[name] = shard
        loads[shard] += count
    return placed


def shard_loads(assignment: dict[str, int], counts: dict[str, int], shards: int) -> list[int]:
    """Vectors per shard under an assignment (for tests, logs and /info)."""
    loads = [0] * shards
    for name, shard in assignment.items():
        loads[shard] += counts[name]
    return loads


def version_shard(version: Version, shard: int, shards: int) -> Version:
    """The part of `version` shard `shard` of `shards` serves: its segments and their deletions.

    Everything else (name, model, next_id) stays, so the shard's answers name the same version;
    `live_count` is then the shard's own. With one shard it is the version itself.
    """
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not one of 0..{shards - 1}")
    if shards == 1:
        return version
    assignment = assign_segments([(info.name, info.count) for info in version.segments], shards)
    mine: tuple[SegmentInfo, ...] = tuple(info for info in version.segments if assignment[info.name] == shard)
    names = {info.name for info in mine}
    deleted = {name: ids for name, ids in version.deleted.items() if name in names}
    return dataclasses.replace(version, segments=mine, deleted=deleted)
