"""The Ingress's id -> record lookup of one index version, built from per-segment lookups.

A version's records are its segments' records minus the ids dead in each, with the version's
overrides (a moved or touched file: new record, same vector) on top. Each segment's lookup is built
once, off the event loop, and shared by every version that names the segment, so following a
publish that adds one small segment costs that segment's records, not the collection's (a 300k
record manifest parsed on the loop stalled it for 364 ms).

`VersionRecords` offers what the Ingress used of the format-2 manifest (`record(id)`, `count`,
`source`, the model fields, `index` for /info), so the routes need not know about segments.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from image_search.errors import ArtifactError
from image_search.manifest import ImageRecord
from image_search.segments import SegmentInfo, Version


class RecordLookup(Protocol):
    """What turns a Searcher's ids into images (serve_app/results.py)."""

    def record(self, image_id: int) -> ImageRecord | None: ...


@dataclass(frozen=True)
class SegmentRecords:
    """One segment's records by id (all of them: which are dead depends on the version)."""

    name: str
    by_id: dict[int, ImageRecord]

    @classmethod
    def of(cls, info: SegmentInfo, records: Sequence[ImageRecord]) -> SegmentRecords:
        by_id = {record.id: record for record in records}
        if len(by_id) != len(records):
            raise ArtifactError(f"segment {info.name} lists one id twice")
        return cls(info.name, by_id)


@dataclass(frozen=True)
class SegmentLookup:
    records: SegmentRecords
    dead: frozenset[int]


class VersionRecords:
    """One version's live records: `record(id)` looks in the segments (newest first), skipping dead ids."""

    def __init__(self, version: Version, segments: Sequence[SegmentRecords]) -> None:
        self.version = version
        # Newest first: an edited image's live copy is in a newer segment than its dead one.
        self.lookups = tuple(
            SegmentLookup(records, frozenset(version.deleted_ids(records.name))) for records in reversed(segments)
        )
        self.overrides = {record.id: record for record in version.overrides}

    def record(self, image_id: int) -> ImageRecord | None:
        """The record with this stable id, or None (never indexed, or removed since)."""
        for lookup in self.lookups:
            record = lookup.records.by_id.get(image_id)
            if record is not None and image_id not in lookup.dead:
                return self.overrides.get(image_id, record)
        return None

    def live(self) -> Iterator[ImageRecord]:
        """Every live record (overrides applied), segment by segment: for filters and folder counts."""
        for lookup in self.lookups:
            for image_id, record in lookup.records.by_id.items():
                if image_id not in lookup.dead:
                    yield self.overrides.get(image_id, record)

    @property
    def name(self) -> str:
        return self.version.name

    @property
    def count(self) -> int:
        return self.version.live_count

    @property
    def source(self) -> str:
        return self.version.source

    @property
    def model(self) -> str:
        return self.version.model

    @property
    def model_fingerprint(self) -> str:
        return self.version.model_fingerprint

    @property
    def embedding_dim(self) -> int:
        return self.version.embedding_dim

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.version.preprocessing

    @property
    def precision(self) -> str:
        return self.version.precision

    @property
    def segment_names(self) -> tuple[str, ...]:
        return self.version.segment_names

    @property
    def index(self) -> dict[str, Any]:
        """For /info: the factory of the largest segment (where most vectors are) and the segment count."""
        largest = max(self.version.segments, key=lambda segment: segment.count, default=None)
        factory = largest.index.get("factory") if largest is not None else None
        return {"factory": factory, "segments": len(self.version.segments)}


def assemble_records(version: Version, segments: Sequence[SegmentRecords]) -> VersionRecords:
    return VersionRecords(version, segments)
