"""The index artifact's manifest: what was indexed, with which model, in which order.

Pure data and validation, no I/O. `format_version` is bumped on any incompatible change and a
reader refuses versions it does not know.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from image_search.errors import ArtifactError

FORMAT_VERSION = 1
METRIC = "inner_product"  # on unit vectors, i.e. cosine similarity


@dataclass(frozen=True)
class ImageRecord:
    path: str  # relative to the manifest's `source`
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    model: str
    model_fingerprint: str
    embedding_dim: int
    preprocessing: dict[str, Any]
    index: dict[str, Any]  # IndexSpec.to_dict()
    source: str  # the images location the paths are relative to
    records: tuple[ImageRecord, ...]
    index_sha256: str
    created_at: str
    metric: str = METRIC
    format_version: int = FORMAT_VERSION
    skipped: tuple[dict[str, str], ...] = field(default_factory=tuple)

    @property
    def count(self) -> int:
        return len(self.records)

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
                f"manifest format_version {version!r} is not supported (this server reads {FORMAT_VERSION}); "
                "rebuild the index with this version's index_builder"
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
                metric=str(data.get("metric", METRIC)),
                skipped=tuple(data.get("skipped", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"manifest.json is incomplete or malformed: {exc!r}") from exc
        if data.get("count", manifest.count) != manifest.count:
            raise ArtifactError(f"manifest.json says count {data['count']} but lists {manifest.count} records")
        return manifest
