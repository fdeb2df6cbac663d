"""Image records, and the manifest: a whole index's records and model fields in one object.

Format 3 (image_search/segments.py) stores records per segment and a version file; `Manifest` is
then the manifest-shaped view of a version (`artifact.version_manifest`: live records sorted by key,
the model fields, next_id), which the builder's diff and tools use. `Manifest.from_json` reads the
format-2 manifest.json of older indexes (the builder's --full keeps their ids).

Pure data and validation, no I/O. `format_version` is bumped on any incompatible change and a
reader refuses versions it does not know, with a message saying to rebuild.

Format 2 (living collections):
- every record has a stable `id`, the id the FAISS index returns for it (an `IndexIDMap2`), not
  its position. An image keeps its id as long as its key stays in the collection (edited bytes
  included); ids are never reused: `next_id` is one past the highest id ever given out, removed
  images included, and only grows.
- `key` is relative to the collection root; `source` is that root at build time (the default
  place to read images from; the service may be told another).
- `precision` is what the build ran (fp32, bf16, fp16): vectors from another precision are not
  mixed into one index.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

from image_search.errors import ArtifactError

FORMAT_VERSION = 2
METRIC = "inner_product"  # on unit vectors, i.e. cosine similarity


@dataclass(frozen=True)
class ImageRecord:
    id: int  # stable across versions; what FAISS returns
    key: str  # relative to the collection root (the manifest's `source` by default)
    size: int
    sha256: str
    # The cheap "unchanged?" check of the next incremental build: a file's st_mtime_ns, or an S3
    # object's LastModified in ns. None when unknown (then the content hash decides).
    mtime_ns: int | None = None


@dataclass(frozen=True)
class Manifest:
    model: str
    model_fingerprint: str
    embedding_dim: int
    preprocessing: dict[str, Any]
    index: dict[str, Any]  # IndexSpec.to_dict()
    source: str  # the collection root the keys are relative to, at build time
    records: tuple[ImageRecord, ...]  # sorted by key
    index_sha256: str
    created_at: str
    next_id: int
    precision: str = "fp32"
    metric: str = METRIC
    format_version: int = FORMAT_VERSION
    skipped: tuple[dict[str, str], ...] = field(default_factory=tuple)

    @property
    def count(self) -> int:
        return len(self.records)

    @cached_property
    def _by_id(self) -> dict[int, ImageRecord]:
        # Built once, on first use (cached_property writes the instance dict, allowed on a frozen dataclass).
        return {record.id: record for record in self.records}

    def record(self, image_id: int) -> ImageRecord | None:
        """The record with this stable id, or None (never indexed, or removed since)."""
        return self._by_id.get(image_id)

    def to_json(self) -> str:
        data = asdict(self)
        data["count"] = self.count
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"manifest.json is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ArtifactError("manifest.json must hold a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"manifest format_version {version!r} is not supported (this version reads {FORMAT_VERSION}); "
                "rebuild the index with this version's index_builder (`python -m index_builder --full ...`)"
            )
        try:
            records = tuple(ImageRecord(**record) for record in data["records"])
            manifest = cls(
                model=str(data["model"]),
                model_fingerprint=str(data["model_fingerprint"]),
                embedding_dim=int(data["embedding_dim"]),
                preprocessing=dict(data["preprocessing"]),
                index=dict(data["index"]),
                source=str(data["source"]),
                records=records,
                index_sha256=str(data["index_sha256"]),
                created_at=str(data["created_at"]),
                next_id=int(data["next_id"]),
                precision=str(data["precision"]),
                metric=str(data.get("metric", METRIC)),
                skipped=tuple(data.get("skipped", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"manifest.json is incomplete or malformed: {exc!r}") from exc
        if data.get("count", manifest.count) != manifest.count:
            raise ArtifactError(f"manifest.json says count {data['count']} but lists {manifest.count} records")
        check_records(manifest.records, manifest.next_id)
        return manifest


def check_records(records: tuple[ImageRecord, ...], next_id: int) -> None:
    """Ids unique, non-negative and below next_id; keys unique: anything else would serve a wrong image."""
    ids = [record.id for record in records]
    if len(set(ids)) != len(ids):
        raise ArtifactError("manifest.json lists one id for two images")
    if ids and (min(ids) < 0 or max(ids) >= next_id):
        raise ArtifactError(f"manifest.json has ids outside 0..next_id-1 (next_id {next_id})")
    keys = [record.key for record in records]
    if len(set(keys)) != len(keys):
        raise ArtifactError("manifest.json lists one key twice")
