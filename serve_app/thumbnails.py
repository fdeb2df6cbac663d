"""Small JPEG previews of indexed images, so a results grid never pulls full-size photos."""

from __future__ import annotations

import io
from collections import OrderedDict
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
