"""Where images and index artifacts live: a local folder or an `s3://bucket/prefix`.

A `Store` is rooted at one location and speaks in relative keys ("a/b.jpg"). Keys come from
manifests or from walking the store, never from a request. S3 credentials come only from boto3's
standard chain; `AWS_ENDPOINT_URL(_S3)` is honoured by boto3 itself (MinIO, moto, ...).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol

# Reads and copies of large files (index artifacts) go in pieces of this size: never a whole file in memory.
CHUNK_BYTES = 8 * 1024 * 1024


# How fresh a modification time may be and still be trusted by the cheap "unchanged?" check of the
# next build: a file rewritten with the same size within one tick of the clock that stamps it keeps
# its stamp, so a stamp this close to the moment its bytes were read may hide a later rewrite.
# Local files: the kernel stamps from a coarse clock (one jiffy, 1-10 ms) and a network filesystem
# adds its server's skew; 100 ms covers both without costing a fresh collection a second hashing
# pass. S3: LastModified has whole seconds (truncated) from S3's clock, not ours: 2 s.
LOCAL_MTIME_MARGIN_NS = 100_000_000
S3_MTIME_MARGIN_NS = 2_000_000_000


class StoreError(Exception):
    """A location cannot be read or written."""


def mtime_margin_ns(store: object) -> int:
    """`store`'s stamp granularity (the stores here say theirs; others get the coarser S3 one)."""
    return int(getattr(store, "mtime_margin_ns", S3_MTIME_MARGIN_NS))


def undecodable_name(key: str) -> bool:
    """A key that is not valid UTF-8: a local file name in another encoding (`caf\\xe9.png`), which
    Python carries as surrogate escapes. It cannot go into JSON answers or be asked for by URL."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def printable_key(key: str) -> str:
    """A key as text that always prints and serialises: undecodable bytes shown as \\xNN."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Entry:
    """One object of a store as a listing shows it: enough for a cheap "unchanged?" check."""

    key: str
    size: int
    mtime_ns: int | None  # a file's st_mtime_ns; an S3 object's LastModified in ns


class Store(Protocol):
    uri: str

    def read_bytes(self, key: str) -> bytes: ...

    def write_bytes(self, key: str, data: bytes) -> None: ...

    def exists(self, key: str) -> bool: ...

    def iter_keys(self) -> Iterator[str]: ...

    def iter_entries(self) -> Iterator[Entry]: ...

    def iter_chunks(self, key: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]: ...

    def write_file(self, key: str, path: Path) -> None: ...

    def delete_prefix(self, prefix: str) -> None: ...

    def local_path(self, key: str) -> Path | None: ...


def is_s3_uri(location: str) -> bool:
    return location.startswith("s3://")


def open_store(location: str) -> Store:
    if is_s3_uri(location):
        return S3Store(location)
    return LocalStore(location)


def _check_key(key: str) -> str:
    """Keys are relative POSIX paths inside the store; anything that could escape it is refused."""
    path = PurePosixPath(key)
    if not key or path.is_absolute() or ".." in path.parts or "\\" in key:
        raise StoreError(f"invalid key {key!r}")
    return key


class LocalStore:
    mtime_margin_ns = LOCAL_MTIME_MARGIN_NS

    def __init__(self, location: str | Path) -> None:
        self.root = Path(location).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read {self._path(key)}: {exc.strerror or exc}") from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomic: written to a temporary file beside the target, flushed, then renamed over it."""
        self._write_atomically(key, lambda handle: handle.write(data))

    def _write_atomically(self, key: str, fill: Callable[[BinaryIO], object]) -> None:
        """`fill` writes a temporary file beside the target; it is synced, then renamed over the target,
        so a reader sees the old file or the whole new one, never a part."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                fill(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise StoreError(f"cannot write {target}: {exc.strerror or exc}") from exc
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def iter_keys(self) -> Iterator[str]:
        """Every file under the root, sorted. A folder that cannot be listed is an error, never an
        empty folder: a build would otherwise take its images for removed ones and retire their ids."""
        if not self.root.is_dir():
            raise StoreError(f"{self.root} is not a folder")

        def unlistable(exc: OSError) -> None:
            raise StoreError(f"cannot list {exc.filename}: {exc.strerror or exc}") from exc

        for dirpath, dirnames, filenames in os.walk(self.root, onerror=unlistable):
            dirnames.sort()
            for name in sorted(filenames):
                yield (Path(dirpath) / name).relative_to(self.root).as_posix()

    def iter_entries(self) -> Iterator[Entry]:
        for key in self.iter_keys():
            try:
                stat = self._path(key).stat()
            except FileNotFoundError:
                continue  # removed while listing: not part of the collection any more
            except OSError as exc:  # there but unreadable: not a removal either
                raise StoreError(f"cannot stat {self._path(key)}: {exc.strerror or exc}") from exc
            yield Entry(key, stat.st_size, stat.st_mtime_ns)

    def iter_chunks(self, key: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        try:
            with self._path(key).open("rb") as handle:
                while chunk := handle.read(chunk_bytes):
                    yield chunk
        except OSError as exc:
            raise StoreError(f"cannot read {self._path(key)}: {exc.strerror or exc}") from exc

    def write_file(self, key: str, path: Path) -> None:
        """Atomic like `write_bytes`, copied in chunks."""

        def copy(handle: BinaryIO) -> None:
            with Path(path).open("rb") as source:  # a missing source is a StoreError like any write failure
                shutil.copyfileobj(source, handle, CHUNK_BYTES)

        self._write_atomically(key, copy)

    def delete_prefix(self, prefix: str) -> None:
        """Raises StoreError when something could not be deleted (the caller decides how much that matters)."""
        path = self._path(prefix)
        if not path.exists():
            return
        try:
            shutil.rmtree(path)
        except OSError as exc:
            raise StoreError(f"cannot delete {path}: {exc.strerror or exc}") from exc

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


class S3Store:
    mtime_margin_ns = S3_MTIME_MARGIN_NS

    def __init__(self, location: str, client: Any | None = None) -> None:
        without_scheme = location[len("s3://") :]
        bucket, _, prefix = without_scheme.partition("/")
        if not bucket:
            raise StoreError(f"{location!r} names no bucket; use s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        if client is None:
            import boto3

            client = boto3.client("s3")
        self.client = client

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def read_bytes(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return bytes(response["Body"].read())
        except Exception as exc:  # botocore's ClientError and connection errors alike
            raise StoreError(f"cannot read s3://{self.bucket}/{self._key(key)}: {exc}") from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        # A single PUT is atomic in S3: readers see the old object or the new one, never a part.
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as exc:
            raise StoreError(f"cannot write s3://{self.bucket}/{self._key(key)}: {exc}") from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            # Only "not there" is False; access denied or a dead endpoint must surface as such.
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StoreError(f"cannot check s3://{self.bucket}/{self._key(key)}: {exc}") from exc
        except Exception as exc:
            raise StoreError(f"cannot reach s3://{self.bucket}/{self._key(key)}: {exc}") from exc

    def iter_keys(self) -> Iterator[str]:
        for entry in self.iter_entries():
            yield entry.key

    def iter_entries(self) -> Iterator[Entry]:
        paginator = self.client.get_paginator("list_objects_v2")
        base = f"{self.prefix}/" if self.prefix else ""
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
                for item in page.get("Contents", []):
                    key = item["Key"][len(base) :]
                    if key and not key.endswith("/"):
                        modified = item.get("LastModified")
                        stamp = int(modified.timestamp()) * 1_000_000_000 if modified is not None else None
                        yield Entry(key, int(item.get("Size", 0)), stamp)
        except Exception as exc:
            raise StoreError(f"cannot list {self.uri}: {exc}") from exc

    def iter_chunks(self, key: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            while chunk := body.read(chunk_bytes):
                yield bytes(chunk)
        except Exception as exc:
            raise StoreError(f"cannot read s3://{self.bucket}/{self._key(key)}: {exc}") from exc

    def write_file(self, key: str, path: Path) -> None:
        # upload_file streams from disk (multipart above boto3's threshold); the object appears only when
        # the upload completes, so readers never see a part of it.
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key))
        except Exception as exc:
            raise StoreError(f"cannot write s3://{self.bucket}/{self._key(key)}: {exc}") from exc

    def delete_prefix(self, prefix: str) -> None:
        """Raises StoreError when listing or deleting fails, or S3 reports keys it did not delete."""
        full = self._key(prefix).rstrip("/") + "/"
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if keys:
                    answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
                    if answer.get("Errors"):
                        first = answer["Errors"][0]
                        raise StoreError(
                            f"cannot delete s3://{self.bucket}/{first.get('Key')}: {first.get('Code')} "
                            f"({len(answer['Errors'])} objects not deleted)"
                        )
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"cannot delete s3://{self.bucket}/{full}: {exc}") from exc

    def local_path(self, key: str) -> Path | None:
        return None


class OutsideStore(StoreError):
    """A key names (through a symbolic link) something outside the store's root."""


def open_inside(root: Path, key: str) -> BinaryIO:
    """Open `root/key` for reading only if what it names, links resolved, lies inside `root`.

    Links that stay inside the root are followed (a collection may link its own files); one that
    leads out raises OutsideStore. The resolved path is then opened one component at a time without
    following links (O_NOFOLLOW), so a link swapped in after the check is refused, not followed.
    """
    root = Path(root).resolve()
    try:
        target = (root / _check_key(key)).resolve(strict=True)
    except OSError as exc:
        raise StoreError(f"cannot read {root / key}: {exc.strerror or exc}") from exc
    if not target.is_relative_to(root) or target == root:
        raise OutsideStore(f"{root / key} leads outside {root} (to {target})")
    parts = target.relative_to(root).parts
    try:
        directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory)
                os.close(directory)
                directory = inner
            handle = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=directory)
        finally:
            os.close(directory)
    except OSError as exc:
        raise StoreError(f"cannot read {root / key} without following links: {exc.strerror or exc}") from exc
    return os.fdopen(handle, "rb")
