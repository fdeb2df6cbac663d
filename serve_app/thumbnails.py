"""Small JPEG previews of indexed images, so a results grid never pulls full-size photos."""

from __future__ import annotations

import io

from image_search.decoding import decode_image

THUMBNAIL_QUALITY = 85


def make_thumbnail(data: bytes, size: int, max_pixels: int) -> bytes:
    """Fit the image inside size x size (never enlarging), as a JPEG."""
    image = decode_image(data, max_pixels=max_pixels, draft_size=size)
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    return out.getvalue()
