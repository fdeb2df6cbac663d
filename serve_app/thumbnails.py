"""Small JPEG previews of indexed images, so a results grid never pulls full-size photos."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from PIL import Image

from image_search.decoding import decode_upright, decoding_errors, resize_to_rgb

THUMBNAIL_QUALITY = 85

K = TypeVar("K")


def make_thumbnail(data: bytes, size: int, max_pixels: int) -> bytes:
    """Fit the image inside size x size (never enlarging), as a JPEG.

    Resized in the decoded mode and converted to RGB only once small (no full-size RGB copy).
    """
    image = decode_upright(data, max_pixels=max_pixels, draft_size=size)
    with decoding_errors(None):
        small = resize_to_rgb(image, thumbnail_size(*image.size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
        out = io.BytesIO()
        small.save(out, format="JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
        return out.getvalue()


def thumbnail_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) fitting inside size x size with the aspect kept, never enlarged."""
    scale = min(1.0, size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


class LRUBytes(Generic[K]):
    """A small bounded cache of thumbnails (dict order is recency; single event loop, no lock needed)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[K, bytes] = OrderedDict()

    def get(self, key: K) -> bytes | None:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: K, value: bytes) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)


# Part of every cached file's name: a change to how thumbnails are made bumps it, and the old files
# are never served again (they age out of the folder).
THUMBNAIL_FORMAT = 1
DEFAULT_THUMBNAIL_CACHE_BYTES = 512 * 1024 * 1024
# When the folder grows past its limit, the least recently used files go until it is this full.
EVICT_TO_FRACTION = 0.9


def default_thumbnail_dir() -> Path:
    return Path(tempfile.gettempdir()) / "image_search-thumbnails"


class ThumbnailDiskCache:
    """Thumbnails on disk by content hash and size, in a folder bounded to `max_bytes`.

    Thumbnails decode originals of up to max_pixels; ids are sequential, so a loop over them would
    otherwise cost a decode per request for ever. Keyed by the record's sha256, so an image costs one
    decode per size ever, across replicas of one node and their restarts, and an edited photo (new
    hash) never gets its old thumbnail. Files are written atomically (a reader sees a whole file or
    none); a hit refreshes the file's mtime, and eviction removes the oldest first.
    """

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_THUMBNAIL_CACHE_BYTES) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.total = sum(path.stat().st_size for path in self._files())

    def _files(self) -> list[Path]:
        return [path for path in self.folder.glob(f"*-v{THUMBNAIL_FORMAT}.jpg") if path.is_file()]

    def path(self, sha256: str, size: int) -> Path:
        if not sha256.isalnum():  # a hex digest from our own manifest; never a path part
            raise ValueError(f"not a content hash: {sha256!r}")
        return self.folder / f"{sha256}-{size}-v{THUMBNAIL_FORMAT}.jpg"

    def get(self, sha256: str, size: int) -> bytes | None:
        path = self.path(sha256, size)
        try:
            data = path.read_bytes()
            os.utime(path)  # recently used: evicted last
        except OSError:
            return None
        return data

    def put(self, sha256: str, size: int, data: bytes) -> None:
        """Best effort: a full or read-only disk costs a decode next time, never a failed request."""
        path = self.path(sha256, size)
        try:
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".thumb-", suffix=".tmp")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)
            return
        self.total += len(data)
        if self.total > self.max_bytes:
            self._evict()

    def _evict(self) -> None:
        entries = []
        for path in self._files():
            with contextlib.suppress(OSError):
                stat = path.stat()
                entries.append((stat.st_mtime_ns, stat.st_size, path))
        entries.sort()
        self.total = sum(size for _, size, _ in entries)
        target = int(self.max_bytes * EVICT_TO_FRACTION)
        for _, size, path in entries:
            if self.total <= target:
                break
            with contextlib.suppress(OSError):
                path.unlink()
                self.total -= size


def cached_thumbnail(disk: ThumbnailDiskCache, sha256: str, size: int, make: Callable[[], bytes]) -> bytes:
    """The thumbnail from the disk cache, or `make()` (read + decode + resize) once and then cached."""
    data = disk.get(sha256, size)
    if data is None:
        data = make()
        disk.put(sha256, size, data)
    return data
