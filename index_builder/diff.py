"""What changed in a collection since the published manifest: pure functions, no I/O.

Two steps, because hashing costs a full read of the file:
1. `keys_to_hash(listing, previous)`: keys that are in the published manifest with the same size
   but whose modification time differs (or is unknown). Only these are read and hashed to decide.
   A key whose size and mtime both match is unchanged without reading it; a different size is a
   change without reading it (different bytes for sure).
   New keys are hashed too, but only those with the size of some removed record: they may be
   that image moved (a pure addition costs no read).
2. `diff_collection(listing, previous, hashes)`: the final sorting into added, changed, removed and
   unchanged, the content hash deciding every case step 1 could not.

Identity: an image is its key (its path relative to the collection root). The same key with new
bytes is the same image edited: it keeps its id and gets a new vector. A new key holding exactly
the bytes (size and sha256) of a removed one is that image moved or renamed: it keeps its id and
its vector, under the new key. A removed key's id is retired for good (the manifest's `next_id`
only grows), so a new image never takes an old id.

Stat data is trusted only when it can be: `distrust_fresh_mtimes` forgets a modification time too
close to the moment the build reads the files (a same-size rewrite within the clock's tick keeps
the stamp), so that file is hashed by the next build instead of taken as unchanged. And stamps
that did change on unchanged bytes (a touched file, a moved one) are worth publishing: otherwise
every later build would read those files again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from image_search.manifest import ImageRecord, Manifest
from image_search.storage import Entry

# The share of the published collection a build may remove without --allow-mass-removal: more
# than this is more often an unmounted disk, a wrong --images or a failing listing than intended.
DEFAULT_MAX_REMOVED_SHARE = 0.5


@dataclass(frozen=True)
class CollectionDiff:
    added: tuple[str, ...]  # keys not in the published manifest: new ids
    changed: tuple[ImageRecord, ...]  # published records whose bytes changed: same id, new vector
    removed: tuple[ImageRecord, ...]  # published records whose key is gone: ids retired
    unchanged: tuple[ImageRecord, ...]  # published records to reuse (key, size, mtime: the listing's)
    moved: int = 0  # of `unchanged`: records found under a new key (same bytes as a removed key's)
    restamped: int = 0  # of `unchanged`: same bytes, new modification time (touched) to record

    @property
    def rewrites_records(self) -> bool:
        """Whether reused records changed key or stat data: a version worth publishing by itself."""
        return self.moved > 0 or self.restamped > 0

    @property
    def to_embed(self) -> tuple[str, ...]:
        """Keys whose vectors must be computed, sorted."""
        return tuple(sorted((*self.added, *(record.key for record in self.changed))))


def _previous_records(previous: Manifest | None) -> dict[str, ImageRecord]:
    return {record.key: record for record in previous.records} if previous is not None else {}


def keys_to_hash(listing: Sequence[Entry], previous: Manifest | None) -> list[str]:
    """Keys the cheap check cannot settle, in listing order: published ones with the same size and
    another (or an unknown) modification time, and new ones with the size of a removed record."""
    published = _previous_records(previous)
    listed = {entry.key for entry in listing}
    removed_sizes = {record.size for key, record in published.items() if key not in listed}
    keys = []
    for entry in listing:
        record = published.get(entry.key)
        if record is None:
            if entry.size in removed_sizes:
                keys.append(entry.key)  # maybe a removed image under a new name
        elif record.size == entry.size and (entry.mtime_ns is None or record.mtime_ns != entry.mtime_ns):
            keys.append(entry.key)
    return keys


def diff_collection(listing: Sequence[Entry], previous: Manifest | None, hashes: Mapping[str, str]) -> CollectionDiff:
    """Sort the listing against the published manifest; `hashes` holds the sha256 of every `keys_to_hash` key."""
    published = _previous_records(previous)
    listed = {entry.key for entry in listing}
    added: list[Entry] = []
    changed: list[ImageRecord] = []
    unchanged: list[ImageRecord] = []
    restamped = 0
    for entry in sorted(listing, key=lambda e: e.key):
        record = published.get(entry.key)
        if record is None:
            added.append(entry)
        elif record.size != entry.size:
            changed.append(record)
        elif entry.mtime_ns is not None and record.mtime_ns == entry.mtime_ns:
            unchanged.append(record)
        elif entry.key not in hashes:
            raise ValueError(f"{entry.key} needs its content hash to decide whether it changed")
        elif hashes[entry.key] == record.sha256:
            # Touched, same bytes. A new stamp we can trust is recorded (published), so that the next
            # build does not read the file again; an untrusted one (None) would change nothing.
            restamped += entry.mtime_ns is not None
            unchanged.append(replace(record, mtime_ns=entry.mtime_ns))
        else:
            changed.append(record)
    removed = [record for key, record in sorted(published.items()) if key not in listed]
    moves = match_moves(added, removed, hashes)
    moved_from = {record.key for record in moves.values()}
    unchanged.extend(
        replace(record, key=entry.key, size=entry.size, mtime_ns=entry.mtime_ns)
        for entry in added
        if (record := moves.get(entry.key)) is not None
    )
    unchanged.sort(key=lambda record: record.key)
    return CollectionDiff(
        added=tuple(entry.key for entry in added if entry.key not in moves),
        changed=tuple(changed),
        removed=tuple(record for record in removed if record.key not in moved_from),
        unchanged=tuple(unchanged),
        moved=len(moves),
        restamped=restamped,
    )


def match_moves(
    added: Sequence[Entry], removed: Sequence[ImageRecord], hashes: Mapping[str, str]
) -> dict[str, ImageRecord]:
    """New key -> the removed record it is (same size and sha256), each record taken at most once.

    Copies of one image pair up in key order: the first new key takes the first removed key's
    record; a surplus copy is a plain addition.
    """
    by_content: dict[tuple[int, str], list[ImageRecord]] = {}
    for record in sorted(removed, key=lambda r: r.key):
        by_content.setdefault((record.size, record.sha256), []).append(record)
    moves: dict[str, ImageRecord] = {}
    for entry in sorted(added, key=lambda e: e.key):
        digest = hashes.get(entry.key)
        candidates = by_content.get((entry.size, digest)) if digest else None
        if candidates:
            moves[entry.key] = candidates.pop(0)
    return moves


def distrust_fresh_mtimes(listing: Sequence[Entry], reads_from_ns: int, margin_ns: int) -> list[Entry]:
    """The listing with every modification time newer than `reads_from_ns - margin_ns` forgotten.

    `reads_from_ns` is a time (of the clock that stamps the files) before the build reads any
    file; `margin_ns` the stamps' granularity. A stamp in that window may be shared by a same-size
    rewrite after the read, which the cheap check would then take for unchanged: recorded as
    unknown instead, the next build hashes the file and records a stamp it can trust.
    """
    cutoff = reads_from_ns - margin_ns
    return [
        replace(entry, mtime_ns=None) if entry.mtime_ns is not None and entry.mtime_ns > cutoff else entry
        for entry in listing
    ]


def removal_refusal(diff: CollectionDiff, published_count: int, max_share: float) -> str | None:
    """Why a build that removes more than `max_share` of the published images must not publish; None if fine."""
    removed = len(diff.removed)
    if published_count <= 0 or removed <= max_share * published_count:
        return None
    return (
        f"this build would remove {removed} of the {published_count} published images "
        f"({removed / published_count:.0%}, more than --max-removed-share {max_share:g})"
    )


def assign_ids(diff: CollectionDiff, embedded: Sequence[ImageRecord], next_id: int) -> tuple[list[ImageRecord], int]:
    """Final records (sorted by key) and the new next_id.

    `embedded` are the freshly read records of `diff.to_embed` that decoded (ids not set yet); a
    changed image keeps its published id, an added one gets the next unused id in key order. A
    changed image that no longer decodes is dropped (its id retired, like a removal).
    """
    published_ids = {record.key: record.id for record in diff.changed}
    records = list(diff.unchanged)
    for record in sorted(embedded, key=lambda r: r.key):
        if record.key in published_ids:
            records.append(replace(record, id=published_ids[record.key]))
        else:
            records.append(replace(record, id=next_id))
            next_id += 1
    records.sort(key=lambda r: r.key)
    return records, next_id


def full_diff(listing: Sequence[Entry], previous: Manifest | None) -> CollectionDiff:
    """A complete rebuild that still keeps the published ids: every listed key is embedded again."""
    published = _previous_records(previous)
    listed = {entry.key for entry in listing}
    added = tuple(sorted(key for key in listed if key not in published))
    changed = tuple(record for key, record in sorted(published.items()) if key in listed)
    removed = tuple(record for key, record in sorted(published.items()) if key not in listed)
    return CollectionDiff(added, changed, removed, ())
