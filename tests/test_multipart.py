"""The streaming multipart reader without Ray: round trips, every chunking, limits at the byte."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from image_search.errors import (
    ClientError,
    FileTooLarge,
    MalformedRequest,
    RequestTooLarge,
    TooManyFields,
    TooManyFiles,
)
from serve_app.config import UploadLimits
from serve_app.multipart import Upload, read_form

BOUNDARY = "b0undary7MA4YWxkTrZu0gW"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
LIMITS = UploadLimits(max_files=4, max_file_bytes=2048, max_request_bytes=16_384, max_fields=3)

filenames = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_. ", min_size=1, max_size=40).filter(str.strip)
file_bodies = st.binary(max_size=LIMITS.max_file_bytes)


def encode(files: Sequence[tuple[str, bytes]], fields: Sequence[tuple[str, str]] = ()) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields
    ]
    for filename, data in files:
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def chunked(body: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    """The body as the ASGI server might deliver it: split at arbitrary offsets."""
    offsets = sorted({cut % (len(body) + 1) for cut in cuts} | {0, len(body)})

    async def stream() -> AsyncIterator[bytes]:
        for start, end in itertools.pairwise(offsets):
            yield body[start:end]

    return stream()


def read(body: bytes, cuts: list[int] | None = None, limits: UploadLimits = LIMITS) -> list[Upload]:
    uploads, _ = asyncio.run(read_form(CONTENT_TYPE, None, chunked(body, cuts or []), limits))
    return uploads


@settings(max_examples=150, deadline=None)
@given(
    files=st.lists(st.tuples(filenames, file_bodies), min_size=1, max_size=LIMITS.max_files),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
)
def test_files_come_back_in_order_however_the_body_is_chunked(files: list[tuple[str, bytes]], cuts: list[int]) -> None:
    uploads = read(encode(files), cuts)
    assert [(upload.filename, bytes(upload.data)) for upload in uploads] == files


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=4096), cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_arbitrary_bytes_give_uploads_or_a_client_error(body: bytes, cuts: list[int]) -> None:
    # Anything but a ClientError (a parser exception, an IndexError) would be a 500 for client bytes.
    with contextlib.suppress(ClientError):
        read(body, cuts)


@settings(max_examples=300, deadline=None)
@given(
    files=st.lists(st.tuples(filenames, st.binary(max_size=64)), min_size=1, max_size=3),
    position=st.integers(min_value=0),
    garbage=st.binary(min_size=1, max_size=16),
    cuts=st.lists(st.integers(min_value=0), max_size=6),
)
def test_a_damaged_valid_body_gives_uploads_or_a_client_error(
    files: list[tuple[str, bytes]], position: int, garbage: bytes, cuts: list[int]
) -> None:
    body = encode(files)
    at = position % len(body)
    with contextlib.suppress(ClientError):
        read(body[:at] + garbage + body[at + len(garbage) :], cuts)


@pytest.mark.parametrize("size", [1, 7, 64, 4096])
def test_a_file_exactly_at_the_limit_passes_and_one_byte_more_is_that_files_error(size: int) -> None:
    at_limit = b"x" * LIMITS.max_file_bytes
    cuts = list(range(0, 6 * LIMITS.max_file_bytes, size))
    assert bytes(read(encode([("a.jpg", at_limit)]), cuts)[0].data) == at_limit
    over, after = read(encode([("a.jpg", at_limit + b"x"), ("b.jpg", b"yz")]), cuts)
    assert isinstance(over.error, FileTooLarge) and over.error.filename == "a.jpg"
    assert over.data == b""  # nothing of a refused file is kept
    assert (after.error, bytes(after.data)) == (None, b"yz")  # the next file is read as usual


def test_the_request_limit_counts_every_byte_received() -> None:
    body = encode([("a.jpg", b"x" * 1000)])
    exact = UploadLimits(**{**LIMITS.model_dump(), "max_request_bytes": len(body)})
    assert len(read(body, limits=exact)) == 1
    smaller = UploadLimits(**{**LIMITS.model_dump(), "max_request_bytes": len(body) - 1})
    with pytest.raises(RequestTooLarge):
        read(body, limits=smaller)


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    async def never_read() -> AsyncIterator[bytes]:
        raise AssertionError("the body was read")
        yield b""  # pragma: no cover

    declared = str(LIMITS.max_request_bytes + 1)
    with pytest.raises(RequestTooLarge):
        asyncio.run(read_form(CONTENT_TYPE, declared, never_read(), LIMITS))


def test_one_file_over_the_count_limit_is_refused() -> None:
    files = [(f"{index}.jpg", b"x") for index in range(LIMITS.max_files)]
    assert len(read(encode(files))) == LIMITS.max_files
    with pytest.raises(TooManyFiles):
        read(encode([*files, ("extra.jpg", b"x")]))


def test_fields_beyond_the_limit_are_refused() -> None:
    fields = [(f"f{index}", "v") for index in range(LIMITS.max_fields)]
    assert len(read(encode([("a.jpg", b"x")], fields))) == 1
    with pytest.raises(TooManyFields):
        read(encode([("a.jpg", b"x")], [*fields, ("one_more", "v")]))


def test_a_path_in_a_filename_keeps_only_its_last_part() -> None:
    (upload,) = read(encode([("../../etc/passwd", b"x")]))
    assert upload.filename == "passwd"


def test_a_truncated_body_is_malformed_or_has_no_files() -> None:
    body = encode([("a.jpg", b"x" * 100)])
    try:
        uploads = read(body[: len(body) // 2])
    except MalformedRequest:
        return
    assert uploads == []
