"""Search forms without Ray: texts and weights from multipart and urlencoded bodies, limits while reading."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from image_search.errors import (
    InvalidText,
    InvalidWeights,
    MalformedRequest,
    NotMultipart,
    RequestTooLarge,
    TextTooLong,
    TooManyFields,
)
from serve_app.config import UploadLimits
from serve_app.forms import SearchForm, max_urlencoded_bytes, read_search_form

BOUNDARY = "f0rmb0undary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
URLENCODED = "application/x-www-form-urlencoded"
LIMITS = UploadLimits(max_text_chars=20, max_fields=6, max_request_bytes=4096)


def multipart(fields: Sequence[tuple[str, bytes]], files: Sequence[tuple[str, bytes]] = ()) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"
        for name, value in fields
    ]
    parts += [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def chunks(body: bytes, cuts: Sequence[int] = ()) -> AsyncIterator[bytes]:
    offsets = sorted({cut % (len(body) + 1) for cut in cuts} | {0, len(body)})

    async def stream() -> AsyncIterator[bytes]:
        for start, end in itertools.pairwise(offsets):
            yield body[start:end]

    return stream()


def read(content_type: str, body: bytes, cuts: Sequence[int] = (), limits: UploadLimits = LIMITS) -> SearchForm:
    return asyncio.run(read_search_form(content_type, None, chunks(body, cuts), limits))


def test_multipart_texts_weights_and_files_keep_their_order() -> None:
    body = multipart(
        [("text", b"a dog"), ("text_weight", b"-0.5"), ("text", "東京".encode()), ("file_weight", b"2")],
        files=[("a.jpg", b"\xff\xd8 not really")],
    )
    form = read(MULTIPART, body)
    assert [query.text for query in form.texts] == ["a dog", "東京"]
    assert all(query.error is None for query in form.texts)
    assert form.text_weights == ["-0.5"] and form.file_weights == ["2"]
    assert [upload.filename for upload in form.uploads] == ["a.jpg"]


def test_an_over_long_text_field_is_that_text_s_error_and_is_not_kept_whole() -> None:
    long_value = b"x" * (4 * LIMITS.max_text_chars + 500)
    form = read(MULTIPART, multipart([("text", long_value), ("text", b"a cat")]))
    too_long, fine = form.texts
    assert isinstance(too_long.error, TextTooLong) and len(too_long.text) <= 200
    assert fine.error is None and fine.text == "a cat"


def test_bad_utf8_and_control_characters_are_per_text_errors() -> None:
    form = read(MULTIPART, multipart([("text", b"\xc3\x28"), ("text", b"tab\tok"), ("text", b"bell\x07")]))
    assert isinstance(form.texts[0].error, InvalidText)
    assert form.texts[1].error is None and form.texts[1].text == "tab\tok"
    assert isinstance(form.texts[2].error, InvalidText)


def test_a_weight_field_must_be_short_ascii() -> None:
    with pytest.raises(InvalidWeights):
        read(MULTIPART, multipart([("text", b"a"), ("text_weight", "１".encode())]))
    with pytest.raises(InvalidWeights):
        read(MULTIPART, multipart([("text", b"a"), ("text_weight", b"1" * 100)]))


def test_urlencoded_texts_and_weights() -> None:
    body = urlencode([("text", "a red bicycle"), ("text", "café 🚲"), ("text_weight", "1"), ("text_weight", "-1")])
    form = read(URLENCODED, body.encode())
    assert [query.text for query in form.texts] == ["a red bicycle", "café 🚲"]
    assert form.text_weights == ["1", "-1"] and not form.uploads


def test_urlencoded_refuses_photos_too_many_fields_and_too_many_bytes() -> None:
    with pytest.raises(MalformedRequest, match="multipart"):
        read(URLENCODED, b"files=abc&text=a")
    with pytest.raises(TooManyFields):
        read(URLENCODED, b"&".join([b"text=a"] * (LIMITS.max_fields + 1)))
    with pytest.raises(RequestTooLarge):
        read(URLENCODED, b"text=" + b"a" * LIMITS.max_request_bytes)
    form = read(URLENCODED, b"text=%C3%28")
    assert isinstance(form.texts[0].error, InvalidText)


def test_an_urlencoded_body_is_capped_at_what_the_text_limits_allow() -> None:
    """At the cap the body is read (its too-long text is that text's error); one byte over is 413."""
    cap = max_urlencoded_bytes(LIMITS)
    assert cap < LIMITS.max_request_bytes
    at_cap = b"text=" + b"a" * (cap - len(b"text="))
    form = read(URLENCODED, at_cap)
    assert len(form.texts) == 1 and isinstance(form.texts[0].error, TextTooLong)
    with pytest.raises(RequestTooLarge, match="urlencoded"):
        read(URLENCODED, at_cap + b"a")
    # A declared length over the cap is refused before any byte is read.
    with pytest.raises(RequestTooLarge):
        asyncio.run(read_search_form(URLENCODED, str(cap + 1), chunks(b""), LIMITS))


def test_an_urlencoded_body_of_separators_is_refused_before_it_is_split() -> None:
    """`a&a&...`: counted, not split into a list of pairs."""
    with pytest.raises(TooManyFields):
        read(URLENCODED, b"a&" * (LIMITS.max_fields + 1))
    assert read(URLENCODED, b"&".join([b"text=a"] * LIMITS.max_fields) + b"&").texts[0].text == "a"


def test_other_content_types_are_refused_naming_both_forms() -> None:
    with pytest.raises(NotMultipart, match="urlencoded"):
        read("application/json", b'{"text": "a dog"}')


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.text(alphabet=st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=20), max_size=4),
    st.lists(st.integers(0, 10_000), max_size=8),
)
def test_any_chunking_of_a_multipart_body_gives_the_same_texts(texts: list[str], cuts: list[int]) -> None:
    body = multipart([("text", text.encode()) for text in texts])
    whole = read(MULTIPART, body)
    split = read(MULTIPART, body, cuts)
    assert [(q.text, q.error and q.error.code) for q in split.texts] == [
        (q.text, q.error and q.error.code) for q in whole.texts
    ]
    assert len(whole.texts) == len(texts)
