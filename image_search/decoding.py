"""Image bytes -> upright RGB PIL image, for the query path and the index builder alike.

Only an allow-list of formats is ever parsed, so Pillow's rarer (and more often vulnerable)
decoders never see client bytes. The pixel limit is checked from the header, before decoding.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, UnidentifiedImageError

from image_search.errors import ClientError, CorruptImage, EmptyFile, NotAnImage, TooManyPixels, UnsupportedFormat

# Pillow format names we decode. Everything else (SVG, PDF, HEIC, PSD, EPS, ...) is refused.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 50_000_000

# Magic numbers of formats people send that we do not decode: they get 415, not "not an image".
_KNOWN_UNSUPPORTED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "PDF"),
    (b"<svg", "SVG"),
    (b"<?xml", "SVG/XML"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
)
_FTYP_BRANDS = {b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}

WHITE = (255, 255, 255)

# Our own pixel limit (checked from the header, with the image's dimensions in the message) replaces
# Pillow's process-wide decompression-bomb check, whose error names no dimensions.
Image.MAX_IMAGE_PIXELS = None

# Signatures of the formats we decode: a file that starts like one of them but does not open is a
# damaged image (corrupt_image), not some other kind of file (not_an_image).
_ALLOWED_SIGNATURES: tuple[bytes, ...] = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM",
                                          b"II*\x00", b"MM\x00*")  # fmt: skip
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _looks_like_allowed_format(data: bytes) -> bool:
    return data.startswith(_ALLOWED_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _png_header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR chunk, read without Pillow (it may refuse the rest of the file)."""
    if data.startswith(PNG_SIGNATURE) and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def _check_pixels(width: int, height: int, max_pixels: int, filename: str | None) -> None:
    if width * height > max_pixels:
        raise TooManyPixels(
            f"The image is {width:,} x {height:,} = {width * height:,} pixels; the limit is {max_pixels:,}.",
            filename,
        )


def _unsupported_format_name(data: bytes) -> str | None:
    head = data[:64].lstrip()
    for signature, name in _KNOWN_UNSUPPORTED_SIGNATURES:
        if head.startswith(signature):
            return name
    if len(data) >= 12 and data[4:8] == b"ftyp" and data[8:12] in _FTYP_BRANDS:
        return "HEIC/AVIF"
    return None


def open_image(data: bytes, filename: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (lazily) an image of an allowed format and check its size before any pixel is decoded."""
    if not data:
        raise EmptyFile("The file is empty.", filename)
    unsupported = _unsupported_format_name(data)
    if unsupported is not None:
        raise UnsupportedFormat(
            f"{unsupported} files are not supported; send JPEG, PNG, WebP, GIF, BMP or TIFF.", filename
        )
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies below; Pillow's bomb warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except UnidentifiedImageError:
        header_size = _png_header_size(data)
        if header_size is not None:
            _check_pixels(*header_size, max_pixels, filename)
        if _looks_like_allowed_format(data):
            raise CorruptImage("The image is damaged: its header does not open.", filename) from None
        raise NotAnImage("The file is not an image we can read.", filename) from None
    except (ClientError, MemoryError):
        raise
    except Exception as exc:  # any decoder failure on these bytes is this image's (see decoding_errors)
        raise CorruptImage(f"The image could not be read: {exc}", filename) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise CorruptImage("The image has no pixels.", filename)
    _check_pixels(width, height, max_pixels, filename)
    return image


# The EXIF orientation values and the transposition that makes each upright (ImageOps.exif_transpose's
# table; applied here directly, because exif_transpose also rewrites the EXIF block, which fails with
# struct.error on malformed values we never need).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
WIDE_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
ALPHA_MODES = frozenset({"RGBA", "LA", "RGBa", "La", "PA"})


@contextmanager
def decoding_errors(filename: str | None) -> Iterator[None]:
    """Whatever a decoder raises on this image's bytes (OSError, struct.error from an EXIF block,
    ValueError, ...) is this image's `corrupt_image`: never a traceback in the builder nor a 500.
    Our own client errors pass through; running out of memory is not the image's fault."""
    try:
        yield
    except (ClientError, MemoryError):
        raise
    except Exception as exc:
        raise CorruptImage(f"The image could not be decoded: {exc}", filename) from None


def _resizable(image: Image.Image) -> tuple[Image.Image, Callable[[Image.Image], Image.Image]]:
    """The image in a mode Pillow resizes, and how to turn a (resized) image of that mode into RGB.

    Converting after the resize keeps the full-size intermediates out: wide (16/32-bit, float)
    images resize in their own mode and are scaled to 8 bits once small; transparent ones resize
    premultiplied (as Pillow's own RGBA resize does) and are composited on white once small.
    """
    if image.mode in WIDE_MODES:
        return image, _wide_to_rgb(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        premultiplied = image.convert("La" if image.mode in ("LA", "La") else "RGBa")
        return premultiplied, _composited_on_white
    if image.mode in ("RGB", "L"):
        return image, _plain_to_rgb
    return image.convert("RGB"), _plain_to_rgb


def _plain_to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _composited_on_white(premultiplied: Image.Image) -> Image.Image:
    """Premultiplied colour + (255 - alpha) x white: the same as pasting the image on white."""
    array = np.asarray(premultiplied, dtype=np.int16)
    colour, alpha = array[..., :-1], array[..., -1:]
    rgb = np.clip(colour + (255 - alpha), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb, mode="RGB")


def _wide_to_rgb(image: Image.Image) -> Callable[[Image.Image], Image.Image]:
    """Scale 16/32-bit single-channel values to 8 bits (Pillow's own conversion clips them to white).

    The range is read from the full image (getextrema: no copy); the scaling runs on what the caller
    made of it (the resized crop), in float32.
    """
    extrema = image.getextrema()  # (low, high) for a single-channel image
    peak = float(extrema[1])  # type: ignore[arg-type]
    # 16-bit data (also when Pillow widens it to mode "I") spans 0..65535.
    is_16_bit = image.mode.startswith("I;16") or 255.0 < peak <= 65535.0
    top = 65535.0 if is_16_bit else max(peak, 255.0)

    def finish(small: Image.Image) -> Image.Image:
        array = np.asarray(small, dtype=np.float32)
        scaled = np.clip(array * np.float32(255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")

    return finish


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded mode to RGB at full size; transparency is composited on white."""
    prepared, finish = _resizable(image)
    return finish(prepared)


def resize_to_rgb(
    image: Image.Image,
    size: tuple[int, int],
    resample: Image.Resampling,
    box: tuple[float, float, float, float] | None = None,
    reducing_gap: float | None = None,
) -> Image.Image:
    """Resize (the `box` region of) an image of any decoded mode, then convert the small result to RGB."""
    prepared, finish = _resizable(image)
    return finish(prepared.resize(size, resample, box=box, reducing_gap=reducing_gap))


def decode_upright(
    data: bytes,
    filename: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode bytes into an upright image in the mode it was stored in (convert with `to_rgb` or
    `resize_to_rgb`). `draft_size`: see `decode_image`. Animated images yield their first frame."""
    image = open_image(data, filename, max_pixels)
    with decoding_errors(filename):
        if draft_size is not None and image.format == "JPEG":
            _apply_jpeg_draft(image, draft_size)
        image.seek(0)
        method = _UPRIGHT.get(image.getexif().get(0x0112, 1))
        image.load()
        return image.transpose(method) if method is not None else image


def decode_image(
    data: bytes,
    filename: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode bytes into an upright RGB image.

    `draft_size`: when set, JPEGs are decoded at a reduced DCT scale that still keeps the
    shorter side >= draft_size (much faster for photos far larger than the model input).
    Animated images yield their first frame.
    """
    image = decode_upright(data, filename, max_pixels, draft_size)
    with decoding_errors(filename):
        return to_rgb(image)


def draft_scale(width: int, height: int, draft_size: int) -> int:
    """The JPEG DCT scale (1, 2, 4 or 8) that keeps the shorter side >= draft_size."""
    shorter = min(width, height)
    scale = 1
    while scale < 8 and shorter // (scale * 2) >= draft_size:
        scale *= 2
    return scale


def decoded_pixels(data: bytes, draft_size: int | None = None) -> int:
    """How many pixels decoding `data` will hold (after the JPEG draft), read from its header only.

    0 when the header does not open: that file fails on its own when decoded (with its own error).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
        width, height = image.size
        scale = draft_scale(width, height, draft_size) if draft_size is not None and image.format == "JPEG" else 1
    except Exception:
        return 0
    return (width // scale) * (height // scale)


def _apply_jpeg_draft(image: Image.Image, draft_size: int) -> None:
    width, height = image.size
    scale = draft_scale(width, height, draft_size)
    if scale > 1:
        image.draft("RGB", (width // scale, height // scale))
