"""Where an uploaded image goes in the collection: the client's key, checked, or a content-addressed one.

A key is what the builder would list for the file: a relative POSIX path with an image extension
and no hidden part, so a later builder run over the collection agrees with what was written.
"""

from __future__ import annotations

import io
from pathlib import PurePosixPath

from PIL import Image

from image_search.decoding import IMAGE_EXTENSIONS
from serve_app.writes.errors import InvalidKey

UPLOADS_PREFIX = "uploads"
HASH_PREFIX_CHARS = 32  # 128 bits of the sha256: distinct images never share a default key
MAX_KEY_CHARS = 512
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}


def check_key(key: str) -> str:
    """The key as given, or InvalidKey saying what is wrong with it."""
    path = PurePosixPath(key)
    if not key or len(key) > MAX_KEY_CHARS or not key.isprintable():
        raise InvalidKey(f"A key must be 1..{MAX_KEY_CHARS} printable characters.")
    if key.startswith("/") or "\\" in key or any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidKey(f"The key {key!r} must be a relative path like 'products/123.jpg' (no '..', no '//').")
    if any(part.startswith(".") for part in path.parts):
        raise InvalidKey(f"The key {key!r} has a hidden part (starting with '.'); the builder would skip it.")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise InvalidKey(f"The key {key!r} must end in an image extension: {', '.join(sorted(IMAGE_EXTENSIONS))}.")
    return key


def image_extension(data: bytes, filename: str) -> str:
    """The extension of what the bytes are (they decoded already), else the filename's, else jpg."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            detected = FORMAT_EXTENSIONS.get(str(image.format))
    except Exception:
        detected = None
    if detected is not None:
        return detected
    suffix = PurePosixPath(filename).suffix.lower()
    return suffix[1:] if suffix in IMAGE_EXTENSIONS else "jpg"


def default_key(sha256: str, data: bytes, filename: str) -> str:
    """`uploads/<sha256 prefix>.<ext>`: the same bytes always land on the same key (an idempotent re-upload)."""
    return f"{UPLOADS_PREFIX}/{sha256[:HASH_PREFIX_CHARS]}.{image_extension(data, filename)}"
