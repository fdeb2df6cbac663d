"""Strict parsing of every value a client sends us outside the uploaded files.

Query parameters, path parameters, form fields and the headers we read arrive as arbitrary text.
Each parser here accepts exactly the ASCII spelling it documents and raises a ClientError (4xx)
for anything else, so no client string reaches `int()` or a lookup unchecked. (`str.isdigit()`
accepts characters such as "²" or "٣" that `int()` then rejects or reads differently.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from image_search.errors import ImageNotFound, InvalidK, InvalidSize

# Plain ASCII decimal digits, no sign, no spaces inside, no leading "+".
_DECIMAL = re.compile(r"[0-9]{1,18}")
MAX_ID_DIGITS = 18  # ids are FAISS int64 labels; 18 digits always fit
MAX_ECHO_CHARS = 40  # how much of a bad value an error message repeats


def _echo(raw: str) -> str:
    """A bounded, printable rendering of a client value for an error message."""
    return repr(raw[:MAX_ECHO_CHARS])


def parse_decimal(raw: str) -> int | None:
    """The value of a plain ASCII decimal string (surrounding ASCII spaces allowed), else None."""
    text = raw.strip(" \t")
    if not _DECIMAL.fullmatch(text):
        return None
    return int(text)


def parse_k(raw: str | None, default_k: int, max_k: int) -> int:
    """`k` from the query string: absent -> default; otherwise a whole number in 1..max_k."""
    if raw is None:
        return default_k
    k = parse_decimal(raw)
    if k is None:
        raise InvalidK(f"k must be a whole number from 1 to {max_k}; got {_echo(raw)}.")
    if not 1 <= k <= max_k:
        raise InvalidK(f"k must be from 1 to {max_k}; got {k}.")
    return k


def parse_image_id(raw: str) -> int:
    """An image id from the path: a plain decimal number, else 404 (there is no image by that name)."""
    image_id = parse_decimal(raw) if len(raw) <= MAX_ID_DIGITS else None
    if image_id is None or raw != raw.strip():
        raise ImageNotFound(f"There is no indexed image with id {_echo(raw)}.")
    return image_id


def parse_thumbnail_size(raw: str, allowed: Sequence[int]) -> int:
    """`size` from the query string: one of the allowed thumbnail sizes."""
    size = parse_decimal(raw)
    if size is None or size not in allowed:
        raise InvalidSize(f"size must be one of {', '.join(map(str, allowed))}; got {_echo(raw)}.")
    return size
