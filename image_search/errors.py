"""Errors a client can cause, raised where they are found.

Each carries a stable `code` and the HTTP status it maps to; the Ingress turns them into the JSON
error shape of DESIGN.md in one place (`serve_app.http_errors`). They are small, picklable classes
so they survive crossing a deployment boundary (Ray re-raises them as a subclass of the original).
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """An error with a stable code and HTTP status, answered as the JSON error shape."""

    status: int = 500
    code: str = "internal"
    retry_after_s: int | None = None

    def __init__(self, message: str, filename: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.filename = filename

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.filename))

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "filename": self.filename}


class ClientError(ServiceError):
    """Something the client sent is wrong. Never a 5xx."""

    status = 400
    code = "bad_request"


class Overloaded(ServiceError):
    """A downstream deployment's queue is full (Serve's backpressure)."""

    status = 503
    code = "overloaded"
    retry_after_s = 1


class Unavailable(ServiceError):
    """A downstream replica died or none is running yet; Serve is replacing it."""

    status = 503
    code = "unavailable"
    retry_after_s = 1


class Timeout(ServiceError):
    """Our own end-to-end deadline passed before the answer was ready."""

    status = 503
    code = "timeout"
    retry_after_s = 1


class IndexedImageUnreadable(ServiceError):
    """An image the index lists cannot be read or decoded: a fault in our data, not the client's."""

    status = 500
    code = "indexed_image_unreadable"


class IndexedImageChanged(ServiceError):
    """What an indexed image's key names now is not the record's image (other size or hash, or a link
    out of the collection): answered 409 instead of bytes that are not the record's (a rebuild fixes it)."""

    status = 409
    code = "indexed_image_changed"


class EmptyFile(ClientError):
    code = "empty_file"


class NotAnImage(ClientError):
    code = "not_an_image"


class CorruptImage(ClientError):
    code = "corrupt_image"


class UnsupportedFormat(ClientError):
    status = 415
    code = "unsupported_format"


class TooManyPixels(ClientError):
    status = 413
    code = "too_many_pixels"


class TooManyRequestPixels(ClientError):
    """The files of one request together would decode to more pixels than a request may use."""

    status = 413
    code = "too_many_pixels_in_request"


class FileTooLarge(ClientError):
    status = 413
    code = "file_too_large"


class RequestTooLarge(ClientError):
    status = 413
    code = "request_too_large"


class TooManyFiles(ClientError):
    status = 413
    code = "too_many_files"


class TooManyFields(ClientError):
    status = 413
    code = "too_many_fields"


class NoFiles(ClientError):
    code = "no_files"


class NotMultipart(ClientError):
    status = 415
    code = "not_multipart"


class MalformedRequest(ClientError):
    code = "malformed_request"


class InvalidK(ClientError):
    status = 422
    code = "invalid_k"


class InvalidSize(ClientError):
    status = 422
    code = "invalid_size"


class ImageNotFound(ClientError):
    status = 404
    code = "not_found"


# --- text queries and combined queries --------------------------------------------------------


class NoQuery(ClientError):
    code = "no_query"


class EmptyText(ClientError):
    code = "empty_text"


class InvalidText(ClientError):
    """Control characters, or bytes that are not UTF-8."""

    code = "invalid_text"


class TextTooLong(ClientError):
    status = 413
    code = "text_too_long"


class TooManyTexts(ClientError):
    status = 413
    code = "too_many_texts"


class TooManyQueries(ClientError):
    """Files and texts together exceed what one request may ask the model to embed."""

    status = 413
    code = "too_many_queries"


class TextSearchUnavailable(ClientError):
    """The served checkpoint has no text tower or no tokenizer; image search still works."""

    code = "text_search_unavailable"


class InvalidWeights(ClientError):
    """Weights of a combined query that are not finite numbers, or do not match the queries."""

    status = 422
    code = "invalid_weights"


class ZeroQuery(ClientError):
    """All weights are zero, or the weighted sum of the embeddings has (almost) no length."""

    status = 422
    code = "zero_query"


class ArtifactError(Exception):
    """The index artifact is missing, corrupt, or does not fit the model. Raised at start-up."""


class InvalidJson(ClientError):
    """A JSON body that does not parse, or is not the object the route takes."""

    code = "invalid_json"


class InvalidVectors(ClientError):
    """Query vectors of the wrong dimension, not finite, or of zero length."""

    status = 422
    code = "invalid_vectors"


class StoreUnavailable(Exception):
    """The index's storage could not be read just now (unreachable, throttled, a read that failed).

    Not an ArtifactError on purpose: it says nothing about the version itself, so whoever loads a
    version tries again later instead of refusing it (an S3 SlowDown must not refuse a good publish).
    Its message may name server paths and buckets: log it, never send it to a client.
    """


class IndexUnavailable(ServiceError):
    """A search needed index files the Searcher could not read just now (StoreUnavailable); retryable."""

    status = 503
    code = "index_unavailable"
    retry_after_s = 1
