"""The index artifact on a store: versioned folders plus a pointer written last, and their retention.

Layout under the builder's `--out` location:

    versions/<version>/index.faiss
    versions/<version>/manifest.json
    CURRENT                      <- the name of the published version, one line

A build writes a new version folder, re-reads and checks it, and only then replaces CURRENT
(an atomic rename locally, a single PUT on S3). A crash at any point leaves the previous
CURRENT, and so the previous artifact, untouched. A location that directly holds manifest.json
and index.faiss (a plain artifact folder) is read as well.

Loading what is served once: a local index file is checked with a streamed sha256 and opened
memory-mapped, so the replicas of one node share one copy in the page cache. An S3 index is
downloaded once per node into `cache_dir/<hash of the store uri>/<version>/index.faiss` (streamed
to a temporary file while hashing, renamed into place when the hash matches; other processes wait
on a file lock and then only re-verify and map it). Nothing reads a whole index file into memory.

Retention (`versions_to_delete`), the rule and why it is safe:
- CURRENT and the version published just before it are always kept: a replica that resolved
  CURRENT a moment before the switch still finds its files.
- Every version that stopped being current less than `retention_s` ago (default 24 h) is kept.
  A version stops being current when the next one is published, so its retirement time is the
  publish time of its successor (the time in the successor's name, taken just before its files
  are uploaded, so the real margin is `retention_s` minus one upload). The service re-reads CURRENT
  every `reload_interval_s` (at most 30 s) and replicas always (re)start on CURRENT, so a version
  retired longer ago than `retention_s` (hours, far above the reload interval) is not served by
  any running replica, and no restarting replica asks for it. Replicas do not write leases
  (serving nodes have read-only S3 rights, see the README's IAM policies), which is why the rule is
  time-based rather than "in use".
- At least the `keep_versions` newest versions (default 3) are kept, for rollbacks.
A failure to list or delete old versions is a logged warning: CURRENT is already written then,
and the build has succeeded.
"""

from __future__ import annotations

import calendar
import fcntl
import hashlib
import itertools
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss

from image_search.errors import ArtifactError
from image_search.faiss_index import map_index_file
from image_search.manifest import Manifest
from image_search.storage import Store, StoreError

logger = logging.getLogger(__name__)

POINTER = "CURRENT"
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
VERSIONS = "versions"
VERSION_TIME_FORMAT = "%Y%m%dT%H%M%S"  # then ".<microseconds>Z" (names without the fraction still read)
DEFAULT_RETENTION_S = 24 * 3600.0
DEFAULT_KEEP_VERSIONS = 3
# Where S3 index files are cached on a node when the caller names no folder.
DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "image_search-index-cache"
HASH_CHUNK_BYTES = 8 * 1024 * 1024


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """Streamed: never the whole file in memory."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def store_sha256(store: Store, key: str) -> str:
    digest = hashlib.sha256()
    for chunk in store.iter_chunks(key):
        digest.update(chunk)
    return digest.hexdigest()


def new_version_name(now: float | None = None) -> str:
    """Sortable by publish time to the microsecond, so retention orders two builds of one second
    correctly; the random suffix keeps names unique even then."""
    seconds, micros = divmod(int((time.time() if now is None else now) * 1_000_000), 1_000_000)
    stamp = time.strftime(VERSION_TIME_FORMAT, time.gmtime(seconds))
    return f"{stamp}.{micros:06d}Z-{uuid.uuid4().hex[:8]}"


def version_folder(version: str) -> str:
    return f"{VERSIONS}/{version}"


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


# --- publishing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetentionPolicy:
    retention_s: float = DEFAULT_RETENTION_S
    keep_versions: int = DEFAULT_KEEP_VERSIONS

    def __post_init__(self) -> None:
        if self.retention_s < 0:
            raise ValueError("retention_s must be >= 0")
        if self.keep_versions < 2:
            raise ValueError("keep_versions must be >= 2 (CURRENT and the version before it are always kept)")


def publish(
    store: Store,
    index_file: Path,
    manifest: Manifest,
    policy: RetentionPolicy | None = None,
    now: float | None = None,
) -> str:
    """Write a new version, verify it by reading it back (streamed), point CURRENT at it, then prune.

    `manifest.index_sha256` must be the sha256 of `index_file`.
    """
    version = new_version_name(now)
    folder = version_folder(version)
    manifest_text = manifest.to_json()
    store.write_file(_join(folder, INDEX_FILE), index_file)
    store.write_bytes(_join(folder, MANIFEST_FILE), manifest_text.encode())
    # What a reader will load must be what we meant to write (FAISS reports a failed close only on stderr).
    if store_sha256(store, _join(folder, INDEX_FILE)) != manifest.index_sha256:
        raise ArtifactError(f"{store.uri}/{folder}/{INDEX_FILE} does not read back as written")
    if store.read_bytes(_join(folder, MANIFEST_FILE)).decode() != manifest_text:
        raise ArtifactError(f"{store.uri}/{folder}/{MANIFEST_FILE} does not read back as written")
    store.write_bytes(POINTER, (version + "\n").encode())
    try:
        prune_versions(store, version, policy or RetentionPolicy(), time.time() if now is None else now)
    except KeyboardInterrupt:
        # The build is published; an interrupted clean-up only leaves old versions for the next one.
        logger.warning("pruning of old index versions interrupted; they are kept until the next build")
    return version


@dataclass(frozen=True)
class VersionInfo:
    name: str
    published: float | None  # seconds since the epoch, from the name; None if the name has no time


def version_time(name: str) -> float | None:
    """The publish time a version name carries (None if it carries none)."""
    stamp = name.split("-", 1)[0].removesuffix("Z")
    seconds, _, fraction = stamp.partition(".")
    try:
        whole = calendar.timegm(time.strptime(seconds, VERSION_TIME_FORMAT))
    except ValueError:
        return None
    if fraction and not (fraction.isascii() and fraction.isdigit()):
        return None
    return whole + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def list_versions(store: Store) -> list[VersionInfo]:
    """Every version folder under versions/, oldest first (by publish time, then name)."""
    names = {key.split("/")[1] for key in store.iter_keys() if key.startswith(f"{VERSIONS}/") and key.count("/") >= 2}
    infos = [VersionInfo(name, version_time(name)) for name in names]
    return sorted(infos, key=lambda info: (info.published or 0.0, info.name))


def versions_to_delete(versions: Sequence[VersionInfo], current: str, now: float, policy: RetentionPolicy) -> list[str]:
    """The names retention may delete (see the module docstring for the rule); pure, oldest first."""
    ordered = sorted((v for v in versions if v.published is not None), key=lambda v: (v.published, v.name))
    keep = {current}
    names = [v.name for v in ordered]
    if current in names and names.index(current) > 0:
        keep.add(names[names.index(current) - 1])
    keep.update(names[-policy.keep_versions :])
    for version, successor in itertools.pairwise(ordered):
        retired_at = successor.published
        assert retired_at is not None  # filtered above
        if now - retired_at < policy.retention_s:
            keep.add(version.name)
    # Versions whose name carries no time are never deleted: nothing says when they were current.
    return [name for name in names if name not in keep]


def prune_versions(store: Store, current: str, policy: RetentionPolicy, now: float) -> list[str]:
    """Delete what retention allows; every failure is a logged warning (CURRENT is already written)."""
    try:
        doomed = versions_to_delete(list_versions(store), current, now, policy)
    except Exception as exc:  # a listing error must not fail a build that has published
        logger.warning("could not list old index versions at %s to prune them: %s", store.uri, exc)
        return []
    deleted = []
    for name in doomed:
        try:
            store.delete_prefix(version_folder(name))
            deleted.append(name)
        except Exception as exc:
            logger.warning("could not delete old index version %s at %s: %s", name, store.uri, exc)
    return deleted


# --- reading --------------------------------------------------------------------------------------------


def read_current(store: Store) -> str:
    """The version name CURRENT points at."""
    try:
        version = store.read_bytes(POINTER).decode().strip()
    except StoreError as exc:
        raise ArtifactError(
            f"no published index at {store.uri}: cannot read {POINTER} ({exc}); "
            "build one with `python -m index_builder --images SRC --out DST`"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{store.uri}/{POINTER} is not text") from exc
    if not version or "/" in version or version.startswith(".") or len(version) > 200:
        raise ArtifactError(f"{store.uri}/{POINTER} holds an invalid version name {version[:80]!r}")
    return version


def resolve_version(store: Store) -> str:
    """The folder (relative to the store) holding the artifact to read: CURRENT's, or the store's root."""
    if store.exists(POINTER):
        return version_folder(read_current(store))
    if store.exists(MANIFEST_FILE):
        return ""
    raise ArtifactError(
        f"no index at {store.uri}: expected {POINTER} or {MANIFEST_FILE} there; "
        "build one with `python -m index_builder --images SRC --out DST`"
    )


def load_manifest(store: Store, folder: str) -> Manifest:
    try:
        return Manifest.from_json(store.read_bytes(_join(folder, MANIFEST_FILE)))
    except StoreError as exc:
        raise ArtifactError(f"the index at {store.uri} is incomplete: {exc}") from exc


def _corrupt(store: Store, folder: str) -> ArtifactError:
    return ArtifactError(
        f"{_join(folder, INDEX_FILE)} at {store.uri} is corrupt: its checksum does not match manifest.json; "
        "rebuild the index"
    )


def check_artifact(store: Store, folder: str) -> Manifest:
    """The deploy-time check: the manifest parses and the index file's streamed sha256 matches it."""
    manifest = load_manifest(store, folder)
    try:
        actual = store_sha256(store, _join(folder, INDEX_FILE))
    except StoreError as exc:
        raise ArtifactError(f"the index at {store.uri} is incomplete: {exc}") from exc
    if actual != manifest.index_sha256:
        raise _corrupt(store, folder)
    return manifest


def cache_path(cache_dir: Path, store: Store, folder: str) -> Path:
    """Where a node keeps its copy of a remote version's index file."""
    store_hash = hashlib.sha256(store.uri.encode()).hexdigest()[:16]
    return Path(cache_dir) / store_hash / (folder.rsplit("/", 1)[-1] or "_root") / INDEX_FILE


def _download(store: Store, key: str, target: Path, expected_sha256: str) -> bool:
    """Stream `key` to a temporary file beside `target` while hashing; rename it into place if it matches."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as handle:
            for chunk in store.iter_chunks(key):
                digest.update(chunk)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        if digest.hexdigest() != expected_sha256:
            return False
        os.replace(tmp, target)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def local_index_file(store: Store, folder: str, manifest: Manifest, cache_dir: Path) -> Path:
    """A verified local file holding the version's index: the store's own file, or the node's cached copy."""
    key = _join(folder, INDEX_FILE)
    own = store.local_path(key)
    if own is not None:
        try:
            if file_sha256(own) != manifest.index_sha256:
                raise _corrupt(store, folder)
        except OSError as exc:
            raise ArtifactError(f"the index at {store.uri} is incomplete: cannot read {own}: {exc}") from exc
        return own
    target = cache_path(cache_dir, store, folder)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with (target.parent / ".lock").open("w") as lock:
            # One download per node: other processes wait here, then find the file and only verify it.
            fcntl.flock(lock, fcntl.LOCK_EX)
            if target.exists():
                if file_sha256(target) == manifest.index_sha256:
                    return target
                logger.warning("cached index %s does not match its manifest; fetching it again", target)
                target.unlink()
            if not _download(store, key, target, manifest.index_sha256):
                raise _corrupt(store, folder)
            return target
    except StoreError as exc:
        raise ArtifactError(f"the index at {store.uri} is incomplete: {exc}") from exc
    except OSError as exc:
        raise ArtifactError(f"cannot cache the index of {store.uri} in {target.parent}: {exc}") from exc


def open_index(store: Store, folder: str, manifest: Manifest, cache_dir: Path = DEFAULT_CACHE_DIR) -> faiss.Index:
    """The version's index, checked against its manifest and memory-mapped from a local file."""
    path = local_index_file(store, folder, manifest, cache_dir)
    try:
        index = map_index_file(path)
    except RuntimeError as exc:
        raise ArtifactError(f"{_join(folder, INDEX_FILE)} at {store.uri} is not a FAISS index: {exc}") from exc
    if index.ntotal != manifest.count or index.d != manifest.embedding_dim:
        raise ArtifactError(
            f"the index at {store.uri} holds {index.ntotal} vectors of dim {index.d}, "
            f"but its manifest lists {manifest.count} of dim {manifest.embedding_dim}"
        )
    return index


@dataclass(frozen=True)
class LoadedArtifact:
    manifest: Manifest
    index: faiss.Index
    location: str  # the concrete version folder it was read from


def load_artifact(store: Store, folder: str | None = None, cache_dir: Path = DEFAULT_CACHE_DIR) -> LoadedArtifact:
    """Read and check an artifact; every inconsistency is an ArtifactError naming what is wrong."""
    folder = resolve_version(store) if folder is None else folder
    manifest = load_manifest(store, folder)
    index = open_index(store, folder, manifest, cache_dir)
    return LoadedArtifact(manifest=manifest, index=index, location=_join(store.uri, folder).rstrip("/"))
