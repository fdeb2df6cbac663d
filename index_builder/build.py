"""Build an index artifact from a collection of images: discover, embed, index, publish."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np

from image_search.artifact import publish, sha256_hex
from image_search.decoding import IMAGE_EXTENSIONS
from image_search.faiss_index import build_faiss_index, serialize_index
from image_search.index_spec import IndexSpec, choose_index_spec
from image_search.manifest import ImageRecord, Manifest
from image_search.storage import Store, open_store


class BuildError(Exception):
    """The build cannot proceed; the message is the one-line reason shown to the user."""


@dataclass
class BuildReport:
    version: str
    count: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    index: IndexSpec | None = None

    @property
    def images_per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


def discover_images(store: Store) -> list[str]:
    """Every image file under the store, by extension, in a stable (sorted) order; hidden files skipped."""
    keys = [
        key
        for key in store.iter_keys()
        if PurePosixPath(key).suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in PurePosixPath(key).parts)
    ]
    return sorted(keys)


@dataclass(frozen=True)
class Collection:
    """Where a build reads from and writes to, and the images it found."""

    source: Store
    out: Store
    keys: list[str]


def open_collection(images: str, out: str) -> Collection:
    """Both locations of a build (folders or s3:// prefixes) and the images found; none is an error."""
    source = open_store(images)
    keys = discover_images(source)
    if not keys:
        raise BuildError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {source.uri}")
    return Collection(source=source, out=open_store(out), keys=keys)


def make_manifest(
    *,
    model: str,
    model_fingerprint: str,
    embedding_dim: int,
    preprocessing: dict,
    spec: IndexSpec,
    source: str,
    records: list[ImageRecord],
    index_bytes: bytes,
    skipped: list[tuple[str, str]],
) -> Manifest:
    return Manifest(
        model=model,
        model_fingerprint=model_fingerprint,
        embedding_dim=embedding_dim,
        preprocessing=preprocessing,
        index=spec.to_dict(),
        source=source,
        records=tuple(records),
        index_sha256=sha256_hex(index_bytes),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        skipped=tuple({"path": path, "reason": reason} for path, reason in skipped),
    )


def finish_build(
    *,
    out: Store,
    source: Store,
    records: list[ImageRecord],
    vectors: np.ndarray,
    skipped: list[tuple[str, str]],
    model: str,
    model_fingerprint: str,
    embedding_dim: int,
    preprocessing: dict,
    started: float,
    index_spec: Callable[[int, int], IndexSpec] = choose_index_spec,
) -> BuildReport:
    """Index the vectors and publish the artifact; shared by the local and the Ray engines."""
    if not records:
        raise BuildError(f"no image in {source.uri} could be read ({len(skipped)} skipped)")
    spec = index_spec(len(records), embedding_dim)
    index_bytes = serialize_index(build_faiss_index(vectors, spec))
    manifest = make_manifest(
        model=model,
        model_fingerprint=model_fingerprint,
        embedding_dim=embedding_dim,
        preprocessing=preprocessing,
        spec=spec,
        source=source.uri,
        records=records,
        index_bytes=index_bytes,
        skipped=skipped,
    )
    version = publish(out, index_bytes, manifest)
    return BuildReport(
        version=version, count=len(records), skipped=skipped, seconds=time.perf_counter() - started, index=spec
    )
