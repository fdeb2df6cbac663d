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


def exif_block(entries: list[tuple[int, int, int, bytes]], tail: bytes = b"") -> bytes:
    """A little-endian TIFF-structured EXIF block (no "Exif\\0\\0" prefix): IFD0 with `entries`
    (tag, type, count, 4-byte value or offset), then `tail` at offset 8 + 2 + 12n + 4."""
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack("<HHI", tag, kind, count) + value
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + tail


def malformed_exif(fmt: str, upright: Image.Image, problem: str) -> bytes:
    """A real JPEG or WebP whose EXIF says "rotate 90°" (orientation 6) beside a value that Pillow
    reads but cannot write back (`problem`: "short_out_of_range", a SHORT tag stored as a LONG above
    65535; "negative_rational", a RATIONAL with a negative numerator), or whose EXIF is not TIFF at
    all ("not_tiff"). `upright` is stored turned, so that orientation 6 makes it upright again."""
    orientation = (0x0112, 3, 1, struct.pack("<HH", 6, 0))
    if problem == "short_out_of_range":
        block = exif_block([orientation, (0x0128, 4, 1, struct.pack("<I", 70_000))])
    elif problem == "negative_rational":
        block = exif_block([orientation, (0x011A, 10, 1, struct.pack("<I", 38))], struct.pack("<ii", -1, 0))
    elif problem == "not_tiff":
        block = b"XX*\x00\x08\x00\x00\x00"
    else:
        raise ValueError(problem)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back (ROTATE_270)
    out = io.BytesIO()
    if fmt == "JPEG":
        stored.save(out, format="JPEG", quality=95, exif=b"Exif\x00\x00" + block)
    else:
        stored.save(out, format="WEBP", quality=95, exif=block)
    return out.getvalue()
