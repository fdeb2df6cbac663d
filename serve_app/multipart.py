"""Streaming multipart/form-data reader that enforces every upload limit while reading.

Starlette's own parser spools files over 1 MB to disk and knows no per-file or per-request byte
limit; this one keeps uploads in memory (bounded by the limits) and stops reading at the first
byte over any limit, so the excess is never buffered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from image_search.errors import (
    ClientError,
    FileTooLarge,
    MalformedRequest,
    NotMultipart,
    RequestTooLarge,
    TooManyFields,
    TooManyFiles,
)
from serve_app.client_values import parse_decimal
from serve_app.config import UploadLimits

FILES_FIELD = "files"
MAX_FIELD_BYTES = 4096  # a non-file field never needs more
MAX_FILENAME_CHARS = 255
MAX_PART_HEADER_BYTES = 8192


def human_bytes(size: int) -> str:
    """A byte count as people read it: "10 MB", "512 KB", "900 bytes" (binary multiples)."""
    for unit, factor in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.3g} {unit}"
    return f"{size} bytes"


@dataclass
class Upload:
    """One uploaded file. `error` is set (and `data` dropped) for a per-file problem such as its size."""

    filename: str
    content_type: str
    data: bytearray = field(default_factory=bytearray)
    error: ClientError | None = None


@dataclass
class FormField:
    """A non-file field the caller asked for (e.g. `text`). Past its byte limit the rest of its value
    is read past, not kept, and `too_large` says so (`value` keeps what fit): the caller decides."""

    name: str
    value: bytearray = field(default_factory=bytearray)
    too_large: bool = False


@dataclass
class _Part:
    disposition: bytes = b""
    content_type: bytes = b""
    header_bytes: int = 0
    upload: Upload | None = None
    field_bytes: int = 0
    is_file: bool = False
    field: FormField | None = None


def content_type_boundary(content_type: str | None) -> bytes:
    """The multipart boundary, or NotMultipart if this is not a multipart/form-data body."""
    media_type, params = parse_options_header(content_type or "")
    if media_type != b"multipart/form-data":
        raise NotMultipart("Send the photos as multipart/form-data, in one or more fields named 'files'.")
    boundary = params.get(b"boundary")
    if not boundary:
        raise MalformedRequest("The multipart body has no boundary.")
    return boundary


def _clean_filename(raw: bytes) -> str:
    name = raw.decode("utf-8", errors="replace").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in name if ch.isprintable())[:MAX_FILENAME_CHARS] or "upload"


class _Reader:
    def __init__(self, limits: UploadLimits, field_limits: dict[str, int] | None = None) -> None:
        self.limits = limits
        self.field_limits = field_limits or {}
        self.uploads: list[Upload] = []
        self.form_fields: list[FormField] = []
        self.files = 0
        self.fields = 0
        self.part = _Part()
        self._header_name = b""
        self._header_value = b""

    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]
        self._count_header(end - start)

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        self._count_header(end - start)

    def _count_header(self, size: int) -> None:
        self.part.header_bytes += size
        if self.part.header_bytes > MAX_PART_HEADER_BYTES:
            raise MalformedRequest("A multipart part has oversized headers.")

    def on_header_end(self) -> None:
        name = self._header_name.lower()
        if name == b"content-disposition":
            self.part.disposition = self._header_value
        elif name == b"content-type":
            self.part.content_type = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.disposition)
        if b"name" not in options:
            raise MalformedRequest("A multipart part has no field name.")
        if b"filename" in options:
            self.files += 1
            if self.files > self.limits.max_files:
                raise TooManyFiles(f"Send at most {self.limits.max_files} files per request.")
            self.part.is_file = True
            if options[b"name"] == FILES_FIELD.encode():
                filename = _clean_filename(options[b"filename"])
                self.part.upload = Upload(filename, self.part.content_type.decode("latin-1"))
        else:
            self.fields += 1
            if self.fields > self.limits.max_fields:
                raise TooManyFields(f"Send at most {self.limits.max_fields} form fields per request.")
            name = options[b"name"].decode("latin-1")
            if name in self.field_limits:
                self.part.field = FormField(name)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        size = end - start
        upload = self.part.upload
        if upload is not None:
            if upload.error is not None:
                return  # already refused: the rest is read past, counted only in the request total
            if len(upload.data) + size > self.limits.max_file_bytes:
                # A per-file problem: this file gets an error entry, the others are still answered.
                upload.error = FileTooLarge(
                    f"The file is larger than {human_bytes(self.limits.max_file_bytes)}, the limit per photo.",
                    filename=upload.filename,
                )
                upload.data = bytearray()
                return
            upload.data += data[start:end]
        elif self.part.field is not None:
            self._keep_field_data(self.part.field, data[start:end])
        elif not self.part.is_file:
            self.part.field_bytes += size
            if self.part.field_bytes > MAX_FIELD_BYTES:
                raise MalformedRequest(f"A form field is larger than {MAX_FIELD_BYTES} bytes.")
        # File parts under another field name are read past (and counted in the request total).

    def _keep_field_data(self, form_field: FormField, data: bytes) -> None:
        if form_field.too_large:
            return  # read past; the request byte limit still bounds it
        room = self.field_limits[form_field.name] - len(form_field.value)
        form_field.value += data[:room]
        form_field.too_large = len(data) > room

    def on_part_end(self) -> None:
        if self.part.upload is not None:
            self.uploads.append(self.part.upload)
        if self.part.field is not None:
            self.form_fields.append(self.part.field)


async def read_form(
    content_type: str | None,
    content_length: str | None,
    body: AsyncIterator[bytes],
    limits: UploadLimits,
    field_limits: dict[str, int] | None = None,
) -> tuple[list[Upload], list[FormField]]:
    """Parse a multipart body into the uploads of its `files` fields and the values of the
    non-file fields named in `field_limits` (name -> most bytes kept), each in request order."""
    boundary = content_type_boundary(content_type)
    too_large = RequestTooLarge(f"A request may carry at most {human_bytes(limits.max_request_bytes)}.")
    declared = parse_decimal(content_length) if content_length is not None else None
    if declared is not None and declared > limits.max_request_bytes:
        raise too_large
    reader = _Reader(limits, field_limits)
    callbacks = {
        name: getattr(reader, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
        )
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in body:
            received += len(chunk)
            if received > limits.max_request_bytes:
                raise too_large
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise MalformedRequest(f"The multipart body is malformed: {exc}") from None
    return reader.uploads, reader.form_fields
