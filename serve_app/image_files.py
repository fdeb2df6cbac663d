"""The bytes of an indexed image, for `/images/{id}`: only the record's bytes, from inside the collection.

- A local collection is opened with `storage.open_inside`: a key that leads (through a link) out of
  the collection is refused, so a link from an indexed name to a secret file never serves the secret.
- What is there must still be what was indexed: its size is checked against the record before a
  byte is sent, and files up to HASH_CHECKED_MAX_BYTES are read (in chunks), hashed and compared
  first. A larger file is streamed as it is read and hashed on the way; a mismatch found at its end
  aborts the response (the client never receives a complete wrong file) and is logged.
- Either mismatch is `IndexedImageChanged` (409 indexed_image_changed, with a log line): the record's
  image is no longer what was indexed; the next build indexes what is there now.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from image_search.errors import IndexedImageChanged, IndexedImageUnreadable
from image_search.manifest import ImageRecord
from image_search.storage import LocalStore, OutsideStore, Store, StoreError, open_inside

logger = logging.getLogger("ray.serve")

# Files up to this size are verified whole (sha256) before the answer starts; larger ones stream.
HASH_CHECKED_MAX_BYTES = 8 * 1024 * 1024
STREAM_CHUNK_BYTES = 256 * 1024


def _changed(record: ImageRecord, why: str) -> IndexedImageChanged:
    logger.error("indexed image %s (id %d) is no longer what was indexed: %s", record.key, record.id, why)
    return IndexedImageChanged(
        f"Image {record.id} changed or moved since it was indexed; it is shown again after the next index build."
    )


def _unreadable(record: ImageRecord, exc: Exception) -> IndexedImageUnreadable:
    # The index lists it but the collection lost it: the server's problem, not the client's.
    logger.error("indexed image %s cannot be read: %s", record.key, exc)
    return IndexedImageUnreadable("This indexed image cannot be read right now.")


def _file_chunks(handle: BinaryIO, chunk_bytes: int) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(chunk_bytes):
            yield chunk


def _open_chunks(images: Store, record: ImageRecord, chunk_bytes: int) -> Iterator[bytes]:
    """The record's key as chunks; a local file is opened now (refused if it leads outside) and its size checked."""
    if isinstance(images, LocalStore):
        try:
            handle = open_inside(Path(images.uri), record.key)
        except OutsideStore as exc:
            raise _changed(record, str(exc)) from None
        except StoreError as exc:
            raise _unreadable(record, exc) from None
        size = _file_size(handle)
        if size != record.size:
            handle.close()
            raise _changed(record, f"{size} bytes, indexed with {record.size}")
        return _file_chunks(handle, chunk_bytes)
    return images.iter_chunks(record.key, chunk_bytes)


def _file_size(handle: BinaryIO) -> int:
    return os.fstat(handle.fileno()).st_size


def read_verified(images: Store, record: ImageRecord, chunk_bytes: int = STREAM_CHUNK_BYTES) -> bytes:
    """The whole file, checked against the record's size and sha256 (for thumbnails: decoded anyway)."""
    digest = hashlib.sha256()
    parts = []
    try:
        for chunk in _open_chunks(images, record, chunk_bytes):
            digest.update(chunk)
            parts.append(chunk)
    except StoreError as exc:
        raise _unreadable(record, exc) from None
    data = b"".join(parts)
    if len(data) != record.size or digest.hexdigest() != record.sha256:
        raise _changed(record, f"{len(data)} bytes with another content hash")
    return data


def original_chunks(images: Store, record: ImageRecord, chunk_bytes: int = STREAM_CHUNK_BYTES) -> Iterator[bytes]:
    """What `/images/{id}` sends: verified whole up to HASH_CHECKED_MAX_BYTES, else a checked stream.

    Raises before the answer starts for every problem found up front (missing file, link out,
    size, and for small files the hash); call it off the event loop (it opens and may read).
    """
    if record.size <= HASH_CHECKED_MAX_BYTES:
        return iter([read_verified(images, record, chunk_bytes)])
    try:
        chunks = _open_chunks(images, record, chunk_bytes)
    except StoreError as exc:
        raise _unreadable(record, exc) from None
    return _checked_stream(chunks, record)


def _checked_stream(chunks: Iterator[bytes], record: ImageRecord) -> Iterator[bytes]:
    """Pass chunks on while counting and hashing them; the last chunk is held back until the whole
    file is known to be the record's, so a wrong file never arrives complete."""
    digest = hashlib.sha256()
    sent = 0
    held: bytes | None = None
    try:
        for chunk in chunks:
            digest.update(chunk)
            sent += len(chunk)
            if sent > record.size:
                break
            if held is not None:
                yield held
            held = chunk
    except StoreError as exc:
        raise _unreadable(record, exc) from None
    if sent != record.size or digest.hexdigest() != record.sha256:
        # The answer has started: ending it with an error makes the server drop the connection.
        raise _changed(record, f"{sent} bytes (or more) with another content hash, found while streaming")
    if held is not None:
        yield held
