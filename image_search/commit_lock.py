"""One writer per index root: a lock held in the store itself, taken by every process that commits.

The service's Writer and every CLI builder take the same lock before planning a commit and keep it
until CURRENT is written, so two of them never plan against the same CURRENT and `next_id` (which
gave one id to two images before). Whoever cannot get it is told who holds it.

- Folder: `WRITER.lock` under the root, held with `flock` on an open descriptor. The kernel drops
  it when the holder exits in any way (kill -9 included): no stale lock to clean up. The file's
  text names the holder, for the message others get.
- S3: `WRITER.lease`, created with a conditional PUT (`If-None-Match: *`) holding the holder and an
  expiry. While it is held, a thread of the holder refreshes it (`If-Match` its own ETag) every
  `lease_s / REFRESHES_PER_LEASE`, so a build or a commit longer than `lease_s` keeps it; a lease
  past its expiry is taken over with `If-Match` the stale lease's ETag, so of two processes racing
  for a dead holder's lease exactly one wins. A crashed holder blocks others for at most `lease_s`.
  A holder whose refreshes failed for so long that another took the lease over learns it from
  `check()` (the Writer calls it right before it writes CURRENT) and from `refresh()`.

The lock guards planning and publishing; readers never take it. Nothing here is a sleep used as
synchronisation: waiting for a busy lock polls with a bound (`wait_s`), then fails with the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from image_search.storage import LocalStore, S3Store, Store

LOCK_KEY = "WRITER.lock"
LEASE_KEY = "WRITER.lease"
DEFAULT_LEASE_S = 60.0
DEFAULT_WAIT_S = 0.0  # do not wait: a second builder is told at once who writes
POLL_S = 0.05
# Refreshes per lease lifetime: two refreshes in a row may fail (a slow or briefly unreachable
# store) and the lease still holds.
REFRESHES_PER_LEASE = 3
MIN_REFRESH_INTERVAL_S = 0.2  # whatever lease_s says, the store is not asked more often than this

logger = logging.getLogger(__name__)


class LockBusy(Exception):
    """Another process commits to this index now; the message names it."""


def holder_name(role: str) -> str:
    return f"{role} pid {os.getpid()} on {socket.gethostname()}"


class Lease(Protocol):
    holder: str

    def refresh(self) -> None: ...

    def check(self) -> None: ...

    def release(self) -> None: ...


@dataclass
class FolderLease:
    holder: str
    fd: int

    def refresh(self) -> None:
        """A held flock never expires."""

    def check(self) -> None:
        """A held flock is never lost while its descriptor is open."""

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def _folder_lock(store: LocalStore, holder: str, wait_s: float) -> FolderLease:
    store.root.mkdir(parents=True, exist_ok=True)
    path = store.root / LOCK_KEY
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                other = path.read_text(errors="replace").strip() or "another process"
                os.close(fd)
                raise LockBusy(f"{store.uri} is being written by {other}; wait for it to finish") from None
            time.sleep(POLL_S)  # bounded poll of a lock held by another process
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{holder} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode(), 0)
    return FolderLease(holder, fd)


def _client_error_code(exc: Exception) -> str:
    response: Any = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


@dataclass
class S3Lease:
    holder: str
    store: S3Store
    etag: str
    lease_s: float
    lost: LockBusy | None = None  # set by a refresh that found the lease taken over
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _refresher: threading.Thread | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one refresh at a time

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "expires_at": time.time() + self.lease_s}).encode()

    def refresh(self) -> None:
        """Extend the lease; LockBusy if it was lost (expired and taken over by another writer)."""
        with self._lock:
            if self.lost is not None:
                raise self.lost
            try:
                answer = self.store.client.put_object(
                    Bucket=self.store.bucket, Key=self.store._key(LEASE_KEY), Body=self._body(), IfMatch=self.etag
                )
            except Exception as exc:
                if _client_error_code(exc) in {"PreconditionFailed", "NoSuchKey", "ConditionalRequestConflict"}:
                    self.lost = LockBusy(f"the write lease on {self.store.uri} expired and was taken by another writer")
                    raise self.lost from exc
                raise
            self.etag = str(answer["ETag"])

    def check(self) -> None:
        """LockBusy when a refresh found the lease lost: whoever holds it now may be writing."""
        if self.lost is not None:
            raise self.lost

    def start_refreshing(self) -> None:
        """Refresh in a thread of this process every lease_s / REFRESHES_PER_LEASE until released."""
        interval = max(self.lease_s / REFRESHES_PER_LEASE, MIN_REFRESH_INTERVAL_S)

        def run() -> None:
            while not self._stop.wait(interval):  # a period, not a synchronisation
                try:
                    self.refresh()
                except LockBusy:
                    logger.error("%s lost the write lease on %s", self.holder, self.store.uri)
                    return
                except Exception as exc:  # the store unreachable for a moment: the next period tries again
                    logger.warning("could not refresh the write lease on %s: %s", self.store.uri, exc)

        self._refresher = threading.Thread(target=run, name="write-lease-refresh", daemon=True)
        self._refresher.start()

    def stop_refreshing(self) -> None:
        """No more refreshes (release does this first; a holder that dies stops the same way)."""
        self._stop.set()
        if self._refresher is not None and self._refresher is not threading.current_thread():
            self._refresher.join()
        self._refresher = None

    def release(self) -> None:
        self.stop_refreshing()
        with contextlib.suppress(Exception):  # an expired lease is someone else's now: leave it
            current = self.store.client.head_object(Bucket=self.store.bucket, Key=self.store._key(LEASE_KEY))
            if current["ETag"] == self.etag:
                self.store.client.delete_object(Bucket=self.store.bucket, Key=self.store._key(LEASE_KEY))


def _refreshed(lease: S3Lease) -> S3Lease:
    lease.start_refreshing()
    return lease


def _s3_lease(store: S3Store, holder: str, wait_s: float, lease_s: float) -> S3Lease:
    key = store._key(LEASE_KEY)
    body = S3Lease(holder, store, "", lease_s)._body()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            answer = store.client.put_object(Bucket=store.bucket, Key=key, Body=body, IfNoneMatch="*")
            return _refreshed(S3Lease(holder, store, str(answer["ETag"]), lease_s))
        except Exception as exc:
            if _client_error_code(exc) not in {"PreconditionFailed", "ConditionalRequestConflict"}:
                raise
        # Someone holds (or held) it: take it over only if it has expired.
        try:
            current = store.client.get_object(Bucket=store.bucket, Key=key)
            lease = json.loads(current["Body"].read())
            other, expires_at = str(lease.get("holder", "another process")), float(lease.get("expires_at", 0))
        except Exception as exc:
            if _client_error_code(exc) == "NoSuchKey":
                continue  # released meanwhile: try to create it again
            raise
        if expires_at < time.time():
            try:
                answer = store.client.put_object(Bucket=store.bucket, Key=key, Body=body, IfMatch=current["ETag"])
                return _refreshed(S3Lease(holder, store, str(answer["ETag"]), lease_s))
            except Exception as exc:
                if _client_error_code(exc) not in {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"}:
                    raise
                continue  # another process took it first, or it was released: look again
        if time.monotonic() >= deadline:
            left = max(0.0, expires_at - time.time())
            raise LockBusy(f"{store.uri} is being written by {other} (its lease runs {left:.0f} s more); wait for it")
        time.sleep(POLL_S)  # bounded poll of a lease held by another process


def acquire(store: Store, holder: str, wait_s: float = DEFAULT_WAIT_S, lease_s: float = DEFAULT_LEASE_S) -> Lease:
    """The index root's write lock, or LockBusy naming who holds it (after waiting up to `wait_s`)."""
    if isinstance(store, LocalStore):
        return _folder_lock(store, holder, wait_s)
    if isinstance(store, S3Store):
        return _s3_lease(store, holder, wait_s, lease_s)
    raise TypeError(f"no commit lock for {type(store).__name__}")


@contextlib.contextmanager
def commit_lock(
    store: Store, holder: str, wait_s: float = DEFAULT_WAIT_S, lease_s: float = DEFAULT_LEASE_S
) -> Iterator[Lease]:
    lease = acquire(store, holder, wait_s, lease_s)
    try:
        yield lease
    finally:
        lease.release()
