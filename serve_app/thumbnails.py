"""Small JPEG previews of indexed images, so a results grid never pulls full-size photos."""

from __future__ import annotations

import io
from collections import OrderedDict
from typing import Generic, TypeVar

from image_search.decoding import decode_image

THUMBNAIL_QUALITY = 85

K = TypeVar("K")


def make_thumbnail(data: bytes, size: int, max_pixels: int) -> bytes:
    """Fit the image inside size x size (never enlarging), as a JPEG."""
    image = decode_image(data, max_pixels=max_pixels, draft_size=size)
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    return out.getvalue()


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
