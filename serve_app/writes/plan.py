"""Planning one group of writes against the live records: pure logic, no I/O, tested without Ray.

Writes are applied in arrival order to a working copy of the live state, so a batch means exactly
what the same writes sent one by one would mean:
- a put of a key not live: `added`, a new id (`next_id` only grows; ids are never reused);
- a put of a live key with other bytes: `replaced`, the same id (its old vector dies in its segment);
- a put of a live key with the same bytes: `unchanged`, its id, nothing written;
- a remove of a live id: `deleted` (its vector dies, its key leaves the store); of an id that is not
  live: `not_found`.
What the plan writes: the bytes of each key whose last put changed it, the keys to delete from the
store, one new segment holding the last put vector of each changed key, and the dead ids per segment.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from image_search.manifest import ImageRecord


@dataclass(frozen=True)
class Put:
    key: str
    data: bytes = field(repr=False)
    sha256: str
    vector: np.ndarray | None = field(default=None, repr=False)  # the Ingress embeds; recovery embeds itself


@dataclass(frozen=True)
class Remove:
    id: int


Op = Put | Remove


@dataclass(frozen=True)
class Outcome:
    status: str  # added | replaced | unchanged | deleted | not_found
    id: int
    key: str | None


@dataclass(frozen=True)
class LiveEntry:
    id: int
    sha256: str
    segment: str | None  # None: written by the batch being planned (no stored vector to kill)
    record: ImageRecord | None = None


@dataclass
class LiveState:
    """The live images of one version by key and by id (what planning needs of it)."""

    version: str
    next_id: int
    by_key: dict[str, LiveEntry] = field(default_factory=dict)
    key_of: dict[int, str] = field(default_factory=dict)

    @classmethod
    def from_segments(
        cls,
        version: str,
        next_id: int,
        live: Iterable[tuple[str, ImageRecord]],
    ) -> LiveState:
        """`live`: (segment, record) of every live id, overrides already applied."""
        state = cls(version, next_id)
        for segment, record in live:
            state.by_key[record.key] = LiveEntry(record.id, record.sha256, segment, record)
            state.key_of[record.id] = record.key
        return state

    def copy(self) -> LiveState:
        return LiveState(self.version, self.next_id, dict(self.by_key), dict(self.key_of))


@dataclass
class Plan:
    outcomes: list[Outcome]
    state: LiveState  # the live state after the batch (segment None for what the batch writes)
    puts: dict[str, tuple[int, Put]]  # key -> (id, last put) for every key whose bytes change
    removed_keys: set[str]  # keys to delete from the store
    dead: dict[str, set[int]]  # segment -> ids whose vectors die there

    @property
    def changes_anything(self) -> bool:
        return bool(self.puts or self.removed_keys or self.dead)


def plan_batch(state: LiveState, ops: Sequence[Op]) -> Plan:
    work = state.copy()
    outcomes: list[Outcome] = []
    puts: dict[str, tuple[int, Put]] = {}
    removed: set[str] = set()
    dead: dict[str, set[int]] = {}

    def kill(entry: LiveEntry) -> None:
        if entry.segment is not None:
            dead.setdefault(entry.segment, set()).add(entry.id)

    for op in ops:
        if isinstance(op, Put):
            entry = work.by_key.get(op.key)
            if entry is not None and entry.sha256 == op.sha256:
                outcomes.append(Outcome("unchanged", entry.id, op.key))
                continue
            if entry is not None:
                kill(entry)
                image_id, status = entry.id, "replaced"
            else:
                image_id, status = work.next_id, "added"
                work.next_id += 1
            work.by_key[op.key] = LiveEntry(image_id, op.sha256, None)
            work.key_of[image_id] = op.key
            puts[op.key] = (image_id, op)
            removed.discard(op.key)
            outcomes.append(Outcome(status, image_id, op.key))
        else:
            key = work.key_of.get(op.id)
            if key is None:
                outcomes.append(Outcome("not_found", op.id, None))
                continue
            entry = work.by_key.pop(key)
            del work.key_of[op.id]
            kill(entry)
            puts.pop(key, None)
            removed.add(key)
            outcomes.append(Outcome("deleted", op.id, key))
    return Plan(outcomes, work, puts, removed, dead)
