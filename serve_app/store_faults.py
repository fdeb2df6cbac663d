"""Which failures of loading an index version are worth retrying, and which refuse the version.

A version is refused (ArtifactError) only for what is wrong with the version itself: a checksum
that does not match, a format this code does not read, another model or dimension. A failure to
read the store (a network reset, an S3 503 SlowDown, a local I/O error, a full cache disk) says
nothing about the version: it becomes StoreUnavailable, which the Ingress's follower, its start and
the Searcher's preloader retry. The storage layer reports those as StoreError (and the local file
system as OSError); older code wraps them in an ArtifactError whose cause they are, so the cause is
what decides here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from image_search.errors import ArtifactError, StoreUnavailable
from image_search.storage import StoreError

IO_ERRORS = (StoreError, OSError)


def is_io_failure(exc: BaseException) -> bool:
    """True when `exc` is (or an ArtifactError wraps) a failure to read or write, not a verdict on the data."""
    if isinstance(exc, StoreUnavailable | StoreError | OSError):
        return True
    return isinstance(exc, ArtifactError) and isinstance(exc.__cause__, IO_ERRORS)


@contextlib.contextmanager
def io_failures_are_transient(what: str) -> Iterator[None]:
    """Re-raise the I/O failures of the block as StoreUnavailable (naming `what`); others pass unchanged."""
    try:
        yield
    except StoreUnavailable:
        raise
    except Exception as exc:
        if not is_io_failure(exc):
            raise
        # The storage error itself says what failed; an ArtifactError around it only repeats the location.
        cause = exc.__cause__ if isinstance(exc, ArtifactError) and exc.__cause__ is not None else exc
        raise StoreUnavailable(f"cannot read {what} just now: {cause}") from exc
