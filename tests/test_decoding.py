"""Decoding rules, without Ray: formats allow-listed, 16-bit scaled, alpha on white, EXIF upright."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from image_search.decoding import decode_image
from image_search.errors import ClientError, CorruptImage, NotAnImage, TooManyPixels
from tests import images
from tests.support import synthetic_image


def test_16_bit_png_is_scaled_not_clipped() -> None:
    decoded = np.asarray(decode_image(images.png_16bit_gray()))
    row = decoded[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert 100 < row[len(row) // 2] < 155  # mid-grey stays mid-grey (a plain convert gives 255)


def test_transparency_is_composited_on_white() -> None:
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    decoded = decode_image(images.encode(transparent, "PNG"))
    assert decoded.mode == "RGB" and decoded.getpixel((4, 4)) == (255, 255, 255)


def test_exif_orientation_is_applied() -> None:
    upright = synthetic_image(3, (300, 200))
    decoded = decode_image(images.exif_rotated_jpeg(upright))
    assert decoded.size == (300, 200)
    difference = np.abs(np.asarray(decoded, dtype=int) - np.asarray(upright, dtype=int)).mean()
    assert difference < 8


def test_animated_gif_gives_first_frame() -> None:
    decoded = decode_image(images.animated_gif())
    first = synthetic_image(3, (200, 150)).convert("P").convert("RGB")
    assert np.abs(np.asarray(decoded, dtype=int) - np.asarray(first, dtype=int)).mean() < 1


def test_pixel_limit_checked_from_header() -> None:
    with pytest.raises(TooManyPixels):
        decode_image(images.png_header_only(5000, 5000), max_pixels=1_000_000)
    assert decode_image(images.png(1, (100, 100)), max_pixels=10_000).size == (100, 100)
    with pytest.raises(TooManyPixels):
        decode_image(images.png(1, (100, 101)), max_pixels=10_000)


def test_formats_outside_the_allow_list_are_not_parsed() -> None:
    ico = images.encode(synthetic_image(1, (32, 32)), "ICO")
    with pytest.raises(NotAnImage):
        decode_image(ico)


def test_truncated_jpeg_is_corrupt() -> None:
    with pytest.raises(CorruptImage):
        decode_image(images.jpeg(1, (640, 480))[:2000])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_decode_or_raise_a_client_error(data: bytes) -> None:
    try:
        image = decode_image(data, max_pixels=1_000_000)
    except ClientError:
        return
    assert image.mode == "RGB"


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 4000), st.integers(1, 400))
def test_corrupted_png_never_escapes_as_another_error(position: int, byte: int) -> None:
    data = bytearray(images.png(2, (64, 48)))
    data[position % len(data)] = byte % 256
    with contextlib.suppress(ClientError):
        decode_image(bytes(data))


def test_a_png_header_without_data_is_too_large_or_damaged_never_not_an_image() -> None:
    header_only = images.png_header_only(20_000, 20_000)
    header_only = header_only[: header_only.index(b"IDAT") - 4]  # IHDR and nothing after it
    with pytest.raises(TooManyPixels, match=r"20,000 x 20,000 = 400,000,000 pixels; the limit is 50,000,000"):
        decode_image(header_only)
    small = images.png_header_only(500, 500)
    with pytest.raises(CorruptImage):
        decode_image(small[: small.index(b"IDAT") - 4])
