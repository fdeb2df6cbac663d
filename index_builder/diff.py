"""What changed in a collection since the published manifest: pure functions, no I/O.

Two steps, because hashing costs a full read of the file:
1. `keys_to_hash(listing, previous)`: keys that are in the published manifest with the same size
   but whose modification time differs (or is unknown). Only these are read and hashed to decide.
   A key whose size and mtime both match is unchanged without reading it; a different size is a
   change without reading it (different bytes for sure).
2. `diff_collection(listing, previous, hashes)`: the final sorting into added, changed, removed and
   unchanged, the content hash deciding every case step 1 could not.

Identity: an image is its key (its path relative to the collection root). The same key with new
bytes is the same image edited: it keeps its id and gets a new vector. A removed key's id is
retired for good (the manifest's `next_id` only grows), so a new image never takes an old id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from image_search.manifest import ImageRecord, Manifest
from image_search.storage import Entry


@dataclass(frozen=True)
class CollectionDiff:
    added: tuple[str, ...]  # keys not in the published manifest: new ids
    changed: tuple[ImageRecord, ...]  # published records whose bytes changed: same id, new vector
    removed: tuple[ImageRecord, ...]  # published records whose key is gone: ids retired
    unchanged: tuple[ImageRecord, ...]  # published records to reuse (mtime updated to the listing's)

    @property
    def to_embed(self) -> tuple[str, ...]:
        """Keys whose vectors must be computed, sorted."""
        return tuple(sorted((*self.added, *(record.key for record in self.changed))))


def _previous_records(previous: Manifest | None) -> dict[str, ImageRecord]:
    return {record.key: record for record in previous.records} if previous is not None else {}


def keys_to_hash(listing: Sequence[Entry], previous: Manifest | None) -> list[str]:
    """Published keys the cheap check cannot settle: same size, other (or unknown) modification time."""
    published = _previous_records(previous)
    return [
        entry.key
        for entry in listing
        if (record := published.get(entry.key)) is not None
        and record.size == entry.size
        and (entry.mtime_ns is None or record.mtime_ns != entry.mtime_ns)
    ]


def diff_collection(listing: Sequence[Entry], previous: Manifest | None, hashes: Mapping[str, str]) -> CollectionDiff:
    """Sort the listing against the published manifest; `hashes` holds the sha256 of every `keys_to_hash` key."""
    published = _previous_records(previous)
    listed = {entry.key for entry in listing}
    added: list[str] = []
    changed: list[ImageRecord] = []
    unchanged: list[ImageRecord] = []
    for entry in sorted(listing, key=lambda e: e.key):
        record = published.get(entry.key)
        if record is None:
            added.append(entry.key)
        elif record.size != entry.size:
            changed.append(record)
        elif entry.mtime_ns is not None and record.mtime_ns == entry.mtime_ns:
            unchanged.append(record)
        elif entry.key not in hashes:
            raise ValueError(f"{entry.key} needs its content hash to decide whether it changed")
        elif hashes[entry.key] == record.sha256:
            unchanged.append(replace(record, mtime_ns=entry.mtime_ns))  # touched, same bytes
        else:
            changed.append(record)
    removed = [record for key, record in sorted(published.items()) if key not in listed]
    return CollectionDiff(tuple(added), tuple(changed), tuple(removed), tuple(unchanged))


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
