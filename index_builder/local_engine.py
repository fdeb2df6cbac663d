"""The single-machine build: decode in a thread pool one batch ahead of the model.

Pillow releases the GIL while decoding and resizing, so the next batch is prepared while torch
runs the current one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from image_search.artifact import sha256_hex
from image_search.errors import ClientError
from image_search.manifest import ImageRecord
from image_search.preprocessing import PreprocessSpec, pixels_from_bytes
from image_search.storage import Store, StoreError


@dataclass(frozen=True)
class Prepared:
    key: str
    record: ImageRecord | None
    pixels: np.ndarray | None
    error: str | None


def prepare_one(store: Store, key: str, spec: PreprocessSpec) -> Prepared:
    """Read and preprocess one image; a failure is reported, never raised (one bad file is not fatal)."""
    try:
        data = store.read_bytes(key)
        pixels = pixels_from_bytes(data, spec, filename=key)
    except (ClientError, StoreError) as exc:
        return Prepared(key, None, None, str(exc))
    # The id is given by the build (index_builder.diff.assign_ids), the mtime from its listing.
    record = ImageRecord(id=-1, key=key, size=len(data), sha256=sha256_hex(data))
    return Prepared(key, record, pixels, None)


def _chunks(keys: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(keys), size):
        yield keys[start : start + size]


def embed_local(
    store: Store,
    keys: Sequence[str],
    spec: PreprocessSpec,
    encode: Callable[[np.ndarray], np.ndarray],
    batch_size: int,
    workers: int = 2,
    on_progress: Callable[[int], None] = lambda n: None,
) -> tuple[list[ImageRecord], np.ndarray, list[tuple[str, str]]]:
    """Embed `keys` in order; returns the records and vectors of the good ones and the skipped ones."""
    records: list[ImageRecord] = []
    vectors: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:

        def submit(chunk: Sequence[str]) -> list[Future[Prepared]]:
            return [pool.submit(prepare_one, store, key, spec) for key in chunk]

        chunks = _chunks(keys, batch_size)
        pending = submit(next(chunks, []))
        for following in [*chunks, None]:
            current = [future.result() for future in pending]
            pending = submit(following) if following is not None else []
            good = [item for item in current if item.pixels is not None]
            skipped.extend((item.key, item.error or "unreadable") for item in current if item.pixels is None)
            if good:
                vectors.append(encode(np.stack([item.pixels for item in good if item.pixels is not None])))
                records.extend(item.record for item in good if item.record is not None)
            on_progress(len(current))
    dim_vectors = np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
    return records, dim_vectors, skipped
