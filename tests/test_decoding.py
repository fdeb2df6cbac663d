"""Decoding rules, without Ray: formats allow-listed, 16-bit scaled, alpha on white, EXIF upright."""

from __future__ import annotations

import contextlib
import io
import struct

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


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
@pytest.mark.parametrize("problem", ["short_out_of_range", "negative_rational"])
def test_a_malformed_exif_value_beside_the_orientation_still_decodes_upright(fmt: str, problem: str) -> None:
    """ImageOps.exif_transpose rewrites the EXIF block and raises struct.error on these values;
    the orientation alone is what decoding needs."""
    upright = synthetic_image(4, (320, 200))
    data = images.malformed_exif(fmt, upright, problem)
    decoded = decode_image(data)
    assert decoded.size == (320, 200)
    assert np.abs(np.asarray(decoded, dtype=int) - np.asarray(upright, dtype=int)).mean() < 8


def test_exif_that_is_not_tiff_is_a_corrupt_webp() -> None:
    with pytest.raises(CorruptImage):
        decode_image(images.malformed_exif("WEBP", synthetic_image(4, (64, 48)), "not_tiff"))


@pytest.mark.parametrize("error", [struct.error("unpack requires a buffer of 4 bytes"), RuntimeError("x"), KeyError(7)])
def test_any_exception_a_decoder_raises_is_corrupt_image(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    from image_search.preprocessing import PreprocessSpec, pixels_from_bytes

    def broken_load(self: Image.Image) -> None:
        raise error

    data = images.png(1, (64, 48))
    monkeypatch.setattr(Image.Image, "load", broken_load)
    monkeypatch.setattr(Image.Image, "getexif", lambda self: {})
    with pytest.raises(CorruptImage) as caught:
        pixels_from_bytes(data, PreprocessSpec(), "broken.png")
    assert caught.value.filename == "broken.png"
    with pytest.raises(CorruptImage):
        decode_image(data)


@pytest.mark.parametrize(
    ("mode", "make"),
    [
        ("RGBA", lambda: images.rgba_half_transparent()),
        ("I;16", lambda: images.png_16bit_gray()),
        (
            "F",
            lambda: images.encode(
                Image.fromarray(np.linspace(0, 900, 64 * 48, dtype=np.float32).reshape(48, 64)), "TIFF"
            ),
        ),
    ],
)
def test_the_crop_is_made_before_converting_and_matches_converting_first(mode: str, make: object) -> None:
    """Resizing in the decoded mode then converting gives the crop of converting first (within 4 levels)."""
    from image_search.preprocessing import PreprocessSpec, pixels_from_bytes, prepare_pixels

    data = make()  # type: ignore[operator]
    assert Image.open(io.BytesIO(data)).mode == mode
    converted_first = prepare_pixels(decode_image(data), PreprocessSpec()).astype(int)
    assert np.abs(pixels_from_bytes(data, PreprocessSpec()).astype(int) - converted_first).max() <= 4
