"""The body of a search request: photos, texts and weights, from multipart or urlencoded forms.

`POST /search` and `POST /search/combined` take multipart/form-data (`files`, `text`,
`file_weight`, `text_weight` fields, as `curl -F` and the page send them). A request with texts
only may also be application/x-www-form-urlencoded (`curl -d`, a plain HTML form). Both readers
stop at the first byte over a limit; values are checked by text_queries and combined.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.multipart import parse_options_header

from image_search.errors import InvalidWeights, MalformedRequest, NotMultipart, TooManyFields
from serve_app.body import read_body
from serve_app.combined import FILE_WEIGHT_FIELD, MAX_WEIGHT_CHARS, TEXT_WEIGHT_FIELD
from serve_app.config import UploadLimits
from serve_app.multipart import FILES_FIELD, FormField, Upload, human_bytes, read_form
from serve_app.text_queries import TEXT_FIELD, TextQuery, max_text_field_bytes, query_values, text_query

# Percent-encoding writes a byte as at most 3 ("%C3"); names and separators fit in this slack.
PERCENT_ENCODED_BYTES_PER_BYTE = 3
URLENCODED_SLACK_BYTES = 1024

MULTIPART = b"multipart/form-data"
URLENCODED = b"application/x-www-form-urlencoded"


@dataclass
class SearchForm:
    uploads: list[Upload] = field(default_factory=list)
    texts: list[TextQuery] = field(default_factory=list)
    file_weights: list[str] = field(default_factory=list)
    text_weights: list[str] = field(default_factory=list)


def field_limits(limits: UploadLimits) -> dict[str, int]:
    """The non-file fields a search reads, and the most bytes kept of each."""
    return {
        TEXT_FIELD: max_text_field_bytes(limits),
        FILE_WEIGHT_FIELD: MAX_WEIGHT_CHARS,
        TEXT_WEIGHT_FIELD: MAX_WEIGHT_CHARS,
    }


def _weight_text(form_field: FormField) -> str:
    if form_field.too_large:
        raise InvalidWeights(f"A '{form_field.name}' is longer than {MAX_WEIGHT_CHARS} characters.")
    try:
        return form_field.value.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidWeights(f"A '{form_field.name}' must be a plain decimal number.") from None


def _form_from_fields(uploads: list[Upload], fields: list[FormField], limits: UploadLimits) -> SearchForm:
    form = SearchForm(uploads=uploads)
    for form_field in fields:
        if form_field.name == TEXT_FIELD:
            form.texts.append(text_query(bytes(form_field.value), limits, cut=form_field.too_large))
        elif form_field.name == FILE_WEIGHT_FIELD:
            form.file_weights.append(_weight_text(form_field))
        elif form_field.name == TEXT_WEIGHT_FIELD:
            form.text_weights.append(_weight_text(form_field))
    return form


def max_urlencoded_bytes(limits: UploadLimits) -> int:
    """The largest urlencoded body the text limits can use: max_fields fields, each as long as the
    longest value any of them keeps, percent-encoded, plus slack for names and separators. Texts
    alone never need more, and a body is held whole while it is parsed, so none may be larger."""
    longest_value = max(field_limits(limits).values())
    most = limits.max_fields * PERCENT_ENCODED_BYTES_PER_BYTE * longest_value + URLENCODED_SLACK_BYTES
    return min(most, limits.max_request_bytes)


async def read_urlencoded(
    content_length: str | None, body: AsyncIterator[bytes], limits: UploadLimits
) -> list[FormField]:
    """The wanted fields of an urlencoded body (texts and their weights; photos need multipart).

    The body is held whole, so it is capped at what the text limits allow (`max_urlencoded_bytes`),
    and its fields are counted before it is split (an 8 MiB `a&a&...` would otherwise become a
    list of millions of objects)."""
    cap = max_urlencoded_bytes(limits)
    raw = await read_body(
        content_length,
        body,
        cap,
        f"An urlencoded request may carry at most {human_bytes(cap)} (texts only; send photos as multipart).",
    )
    # An upper bound on the non-empty fields, counted without splitting.
    if raw.strip(b"&").count(b"&") + 1 > limits.max_fields:
        raise TooManyFields(f"Send at most {limits.max_fields} form fields per request.")
    if query_values(raw, FILES_FIELD):
        raise MalformedRequest("Photos must be sent as multipart/form-data; urlencoded forms carry texts only.")
    fields = []
    for name, limit in field_limits(limits).items():
        for value in query_values(raw, name):
            fields.append(FormField(name, bytearray(value[:limit]), too_large=len(value) > limit))
    return fields


async def read_search_form(
    content_type: str | None, content_length: str | None, body: AsyncIterator[bytes], limits: UploadLimits
) -> SearchForm:
    media_type, _ = parse_options_header(content_type or "")
    if media_type == URLENCODED:
        return _form_from_fields([], await read_urlencoded(content_length, body, limits), limits)
    if media_type != MULTIPART:
        raise NotMultipart(
            "Send photos and texts as multipart/form-data (fields 'files' and 'text'); "
            "texts alone may also be application/x-www-form-urlencoded."
        )
    uploads, fields = await read_form(content_type, content_length, body, limits, field_limits(limits))
    return _form_from_fields(uploads, fields, limits)
