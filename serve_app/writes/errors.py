"""Errors of the write routes (the same JSON error shape as every other error)."""

from __future__ import annotations

from typing import ClassVar

from image_search.errors import ClientError, ServiceError


class WritesDisabled(ServiceError):
    """No write token is configured: the write routes are off."""

    status = 403
    code = "writes_disabled"


class Unauthorized(ServiceError):
    """A missing or wrong bearer token (the message never says which, nor echoes it)."""

    status = 401
    code = "unauthorized"
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


class InvalidKey(ClientError):
    status = 422
    code = "invalid_key"


class InvalidWait(ClientError):
    status = 422
    code = "invalid_wait"


class StoreFull(ServiceError):
    """The collection or index store has no space left: nothing of this request was acknowledged."""

    status = 507
    code = "store_full"


class WriterBusy(ServiceError):
    """Another process (a CLI builder) holds the index's commit lock for longer than a write waits."""

    status = 503
    code = "writer_busy"
    retry_after_s = 5


class WriteFailed(ServiceError):
    """The collection or index store could not be written (logged); nothing of this request was acknowledged."""

    status = 503
    code = "store_unavailable"
    retry_after_s = 1
