"""Text queries as clients send them: checked here, at the edge, before any model sees them.

Pure functions (no Ray, no HTTP objects): bytes of a form field or a query string in, a clean
query string out, or a ClientError saying what is wrong. Every limit comes from UploadLimits.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from image_search.errors import (
    ClientError,
    EmptyText,
    InvalidText,
    MalformedRequest,
    NoFiles,
    NoQuery,
    TextTooLong,
    TooManyQueries,
    TooManyTexts,
)
from serve_app.config import UploadLimits

TEXT_FIELD = "text"
QUERY_PARAM = "q"
# Whitespace a textarea or a shell may put in a query; every other control character is refused.
ALLOWED_CONTROLS = frozenset("\t\n\r")
# Categories never part of a query: C0/C1 controls, and lone surrogates (not encodable as UTF-8).
REFUSED_CATEGORIES = frozenset({"Cc", "Cs"})
MAX_ECHO_CHARS = 200  # how much of a refused text an error entry repeats back
MAX_UTF8_BYTES_PER_CHAR = 4


@dataclass(frozen=True)
class TextQuery:
    """One text as received: `text` is what the entry names; `error` is set when it cannot be used."""

    text: str
    error: ClientError | None = None


def max_text_field_bytes(limits: UploadLimits) -> int:
    """The most bytes a text field may hold: max_text_chars characters of up to 4 UTF-8 bytes each."""
    return limits.max_text_chars * MAX_UTF8_BYTES_PER_CHAR


def echo(text: str) -> str:
    """A refused text as an error entry may repeat it: no control characters, bounded length."""
    shown = "".join("\ufffd" if unicodedata.category(ch) in REFUSED_CATEGORIES else ch for ch in text)
    return shown[:MAX_ECHO_CHARS]


def clean_text(text: str, limits: UploadLimits) -> str:
    """The query to embed: `text` stripped, or EmptyText / TextTooLong / InvalidText."""
    if len(text) > limits.max_text_chars:
        raise TextTooLong(f"A text query may have at most {limits.max_text_chars} characters; got {len(text)}.")
    for ch in text:
        if ch not in ALLOWED_CONTROLS and unicodedata.category(ch) in REFUSED_CATEGORIES:
            raise InvalidText(f"A text query contains the control character U+{ord(ch):04X}.")
    stripped = text.strip()
    if not stripped:
        raise EmptyText("A text query is empty.")
    return stripped


def decode_utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidText("A text query is not valid UTF-8.") from None


def text_query(raw: bytes | str, limits: UploadLimits, cut: bool = False) -> TextQuery:
    """One text field's value (bytes from a form, or a decoded string) as a TextQuery, never raising.

    `cut`: the reader kept only the start of a value longer than max_text_field_bytes.
    """
    if isinstance(raw, bytes):
        readable = raw[: MAX_ECHO_CHARS * MAX_UTF8_BYTES_PER_CHAR].decode("utf-8", errors="replace")
        if cut or len(raw) > max_text_field_bytes(limits):
            error: ClientError = TextTooLong(f"A text query may have at most {limits.max_text_chars} characters.")
            return TextQuery(echo(readable), error)
        try:
            text = decode_utf8(raw)
        except InvalidText as exc:
            return TextQuery(echo(readable), exc)
    else:
        text = raw
    try:
        return TextQuery(clean_text(text, limits))
    except ClientError as exc:
        return TextQuery(echo(text), exc)


def check_counts(files: int, texts: int, limits: UploadLimits) -> None:
    """Request-level limits on how many queries one request may ask the model to embed."""
    if texts > limits.max_texts:
        raise TooManyTexts(f"Send at most {limits.max_texts} text queries per request; got {texts}.")
    if files + texts > limits.max_queries:
        raise TooManyQueries(
            f"Send at most {limits.max_queries} photos and texts together per request; got {files + texts}."
        )
    if files + texts == 0:
        # The code clients already know for an empty search (from before texts were taken).
        raise NoFiles("Send at least one photo (form field 'files') or text (form field 'text').")


def query_values(query_string: bytes, name: str) -> list[bytes]:
    """The raw (percent-decoded, still undecoded UTF-8) values of one query-string parameter.

    Starlette decodes query strings with errors="replace", which would turn invalid UTF-8 into
    U+FFFD silently; text queries must refuse it instead, so they are read from the raw bytes.
    """
    values = []
    for pair in query_string.split(b"&"):
        key, _, value = pair.partition(b"=")
        if unquote_to_bytes(key.replace(b"+", b" ")) == name.encode():
            values.append(unquote_to_bytes(value.replace(b"+", b" ")))
    return values


def single_query_param(query_string: bytes, limits: UploadLimits) -> str:
    """`q` of GET /search: exactly one, a usable text, or the ClientError that says why not."""
    values = query_values(query_string, QUERY_PARAM)
    if not values:
        raise NoQuery(f"Add a text query: /search?{QUERY_PARAM}=a+red+bicycle (or POST photos).")
    if len(values) > 1:
        raise MalformedRequest(f"Send one '{QUERY_PARAM}' per GET request; POST several 'text' fields for more.")
    query = text_query(values[0], limits)
    if query.error is not None:
        raise query.error
    return query.text
