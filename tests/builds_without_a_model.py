"""Builds through `plan_build`/`finish_build` with vectors made from the files' bytes: no model, milliseconds.

Files are plain bytes named *.jpg (the builder lists by extension; nothing here decodes them). A file's
vector is a unit vector seeded by its bytes, so an edited file gets a new vector and a moved one keeps it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from image_search.artifact import RetentionPolicy
from image_search.manifest import ImageRecord
from image_search.merge_policy import MergePolicy
from image_search.storage import Entry, Store, StoreError
from index_builder.build import BuildReport, ModelInfo, finish_build, open_collection, plan_build

DIM = 8
MODEL = ModelInfo(name="fake", fingerprint="fake-fp", embedding_dim=DIM, preprocessing={"size": 8}, precision="fp32")


def vector_of(data: bytes) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
    vector = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def fake_build(
    images: Path | str,
    out: Path | str,
    *,
    full: bool = False,
    compact: bool = False,
    merge_policy: MergePolicy | None = None,
    retention: RetentionPolicy | None = None,
    out_store: Store | None = None,
    max_index_memory: int | None = None,
    before_commit: Callable[[], None] | None = None,
) -> BuildReport:
    collection = open_collection(str(images), str(out))
    if out_store is not None:
        collection = type(collection)(source=collection.source, out=out_store, entries=collection.entries)
    budget = {} if max_index_memory is None else {"max_index_memory": max_index_memory}
    plan = plan_build(
        collection, MODEL, full=full, compact=compact, merge_policy=merge_policy, retention=retention, **budget
    )
    plan = replace(plan, before_commit=before_commit)
    records, vectors = [], []
    for key in plan.diff.to_embed:
        data = collection.source.read_bytes(key)
        records.append(ImageRecord(-1, key, len(data), hashlib.sha256(data).hexdigest()))
        vectors.append(vector_of(data))
    matrix = np.stack(vectors) if vectors else np.zeros((0, DIM), dtype=np.float32)
    return finish_build(plan, records, matrix, [], time.perf_counter())


class RecordingStore:
    """Delegates to a real store; counts bytes written and keys read; `fail_reads` makes chosen reads fail."""

    def __init__(self, inner: Store, fail_reads: Any = lambda key: False) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.fail_reads = fail_reads
        self.written_bytes = 0
        self.reads: list[str] = []

    def _read(self, key: str) -> None:
        if self.fail_reads(key):
            raise StoreError(f"injected failure reading {key}: 503 SlowDown")
        self.reads.append(key)

    def read_bytes(self, key: str) -> bytes:
        self._read(key)
        return self.inner.read_bytes(key)

    def iter_chunks(self, key: str, chunk_bytes: int = 8 * 1024 * 1024) -> Iterator[bytes]:
        self._read(key)
        return self.inner.iter_chunks(key, chunk_bytes)

    def write_bytes(self, key: str, data: bytes) -> None:
        self.written_bytes += len(data)
        self.inner.write_bytes(key, data)

    def write_file(self, key: str, path: Path) -> None:
        self.written_bytes += Path(path).stat().st_size
        self.inner.write_file(key, path)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def iter_keys(self) -> Iterator[str]:
        return self.inner.iter_keys()

    def iter_entries(self) -> Iterator[Entry]:
        return self.inner.iter_entries()

    def delete_prefix(self, prefix: str) -> None:
        self.inner.delete_prefix(prefix)

    def local_path(self, key: str) -> Path | None:
        # None: readers go through read_bytes/iter_chunks (and a cache), so every read is counted.
        return None
