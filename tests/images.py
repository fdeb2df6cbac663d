"""Encoded test images of every kind the service must accept or refuse."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from tests.support import synthetic_image


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def jpeg(seed: int = 1, size: tuple[int, int] = (320, 240)) -> bytes:
    return encode(synthetic_image(seed, size), "JPEG", quality=90)


def png(seed: int = 1, size: tuple[int, int] = (320, 240)) -> bytes:
    return encode(synthetic_image(seed, size), "PNG")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny data chunk: a decompression bomb's shape."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def padded_png(total_bytes: int) -> bytes:
    """A valid PNG padded after IEND to exactly `total_bytes` (decoders ignore trailing bytes)."""
    data = png(7, (64, 64))
    assert len(data) <= total_bytes
    return data + b"\x00" * (total_bytes - len(data))


def animated_gif() -> bytes:
    frames = [synthetic_image(seed, (200, 150)).convert("P") for seed in (3, 4, 5)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def animated_webp() -> bytes:
    frames = [synthetic_image(seed, (200, 150)) for seed in (3, 4)]
    out = io.BytesIO()
    frames[0].save(out, format="WEBP", save_all=True, append_images=frames[1:], duration=100)
    return out.getvalue()


def png_16bit_gray() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, 256, dtype=np.uint16), (128, 1))
    return encode(Image.fromarray(ramp), "PNG")


def palette_with_transparency() -> bytes:
    image = synthetic_image(9, (240, 180)).quantize(64)
    return encode(image, "PNG", transparency=0)


def rgba_half_transparent() -> bytes:
    image = synthetic_image(9, (240, 180)).convert("RGBA")
    image.putalpha(128)
    return encode(image, "PNG")


def exif_rotated_jpeg(upright: Image.Image) -> bytes:
    """Store the picture rotated, with an EXIF orientation that says how to turn it upright."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())
