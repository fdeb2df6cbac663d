"""Image bytes -> upright RGB PIL image, for the query path and the index builder alike.

Only an allow-list of formats is ever parsed, so Pillow's rarer (and more often vulnerable)
decoders never see client bytes. The pixel limit is checked from the header, before decoding.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from image_search.errors import CorruptImage, EmptyFile, NotAnImage, TooManyPixels, UnsupportedFormat

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
    except (OSError, ValueError, SyntaxError) as exc:
        raise CorruptImage(f"The image could not be read: {exc}", filename) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise CorruptImage("The image has no pixels.", filename)
    _check_pixels(width, height, max_pixels, filename)
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit single-channel images to 8 bits (Pillow's own conversion clips them to white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = float(array.max()) if array.size else 0.0
        # 16-bit data (also when Pillow widens it to mode "I") spans 0..65535.
        is_16_bit = image.mode.startswith("I;16") or 255.0 < peak <= 65535.0
        top = 65535.0 if is_16_bit else max(peak, 255.0)
        scaled = np.clip(array * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(scaled, mode="L")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded mode to RGB; transparency is composited on white."""
    image = _to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


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
    image = open_image(data, filename, max_pixels)
    try:
        if draft_size is not None and image.format == "JPEG":
            _apply_jpeg_draft(image, draft_size)
        image.seek(0)
        orientation = image.getexif().get(0x0112, 1)
        image.load()
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise CorruptImage(f"The image could not be decoded: {exc}", filename) from None


def _apply_jpeg_draft(image: Image.Image, draft_size: int) -> None:
    width, height = image.size
    shorter = min(width, height)
    scale = 1
    # JPEG can decode at 1/2, 1/4, 1/8 of full size.
    while scale < 8 and shorter // (scale * 2) >= draft_size:
        scale *= 2
    if scale > 1:
        image.draft("RGB", (width // scale, height // scale))
