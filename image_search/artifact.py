"""Publishing versions of a segmented index (format 3, see segments.py) and their retention.

Layout under the builder's `--out` location: `segments/<segment>/...` (immutable), `versions/<version>/
version.json` (which segments, which ids of each are dead) and `CURRENT`, written last. `publish` commits
a prepared `Version` (version file, read back, then CURRENT, read back) and then prunes.

Retention (`versions_to_delete`, `segments_to_delete`), the rule and why it is safe:
- CURRENT and the version published just before it are always kept (by name order, and the one
  CURRENT's version was planned on, its `parent`): a replica that resolved CURRENT a moment before
  the switch still finds its files.
- Every version that stopped being current less than `retention_s` ago (default 24 h) is kept.
  A version stops being current when the next one is published, so its retirement time is the
  publish time of its successor (the time in the successor's name). The service re-reads CURRENT
  every `reload_interval_s` (at most 30 s) and replicas always (re)start on CURRENT, so a version
  retired longer ago than `retention_s` is not served by any running replica that follows CURRENT.
  Replicas do not write leases (serving nodes have read-only S3 rights), hence a time rule.
- The newest version of each model identity (fingerprint, dim, preprocessing, precision) is kept:
  a service that refused newer publishes because they were made with another model keeps serving
  the version of its own model, and finds it again after a restart.
- At least the `keep_versions` newest versions (default 3) are kept, for rollbacks.
- By reference: a segment is deleted only when no version left after pruning names it, and only
  once it is older than `segment_grace_s` (a build in progress may have written it and not yet its
  version). If any kept version file cannot be read, no segment is deleted.
A failure to list or delete is a logged warning: CURRENT is already written then, and the build
has succeeded. Format-2 version folders (`versions/<v>/manifest.json`) are pruned by the same rules.

`load_artifact` is for tools and tests: the whole version as one manifest-shaped view and one
in-memory exact index over its live vectors (the service loads segments one by one instead).
"""

from __future__ import annotations

import calendar
import fcntl
import hashlib
import itertools
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from image_search.errors import ArtifactError
from image_search.faiss_index import build_faiss_index, map_index_file
from image_search.index_spec import IndexSpec
from image_search.manifest import Manifest
from image_search.segments import (
    SEGMENTS,
    VERSION_FILE,
    Version,
    commit_version,
    file_sha256,
    open_segment_vectors,
    read_contents,
    read_version,
    store_sha256,
)
from image_search.storage import Store, StoreError

logger = logging.getLogger(__name__)

POINTER = "CURRENT"
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
VERSIONS = "versions"
VERSION_TIME_FORMAT = "%Y%m%dT%H%M%S"  # then ".<microseconds>Z" (names without the fraction still read)
DEFAULT_RETENTION_S = 24 * 3600.0
DEFAULT_KEEP_VERSIONS = 3
# An unreferenced segment younger than this may belong to a build that has not written its version yet.
DEFAULT_SEGMENT_GRACE_S = 3600.0
# Where S3 index files are cached on a node when the caller names no folder.
DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "image_search-index-cache"
HASH_CHUNK_BYTES = 8 * 1024 * 1024


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
    segment_grace_s: float = DEFAULT_SEGMENT_GRACE_S

    def __post_init__(self) -> None:
        if self.retention_s < 0 or self.segment_grace_s < 0:
            raise ValueError("retention_s and segment_grace_s must be >= 0")
        if self.keep_versions < 2:
            raise ValueError("keep_versions must be >= 2 (CURRENT and the version before it are always kept)")


def publish(
    store: Store,
    version: Version,
    policy: RetentionPolicy | None = None,
    now: float | None = None,
    before_pointer: Callable[[], None] | None = None,
) -> str:
    """Commit a prepared version (its new segments already uploaded and checked), then prune; its name."""
    commit_version(store, version, before_pointer)
    try:
        prune(store, version.name, policy or RetentionPolicy(), time.time() if now is None else now)
    except KeyboardInterrupt:
        # The build is published; an interrupted clean-up only leaves old versions for the next one.
        logger.warning("pruning of old index versions interrupted; they are kept until the next build")
    return version.name


@dataclass(frozen=True)
class VersionInfo:
    name: str
    published: float | None  # seconds since the epoch, from the name; None if the name has no time


def version_time(name: str) -> float | None:
    """The publish time a version (or segment: `seg-<time>-...`) name carries (None if it carries none)."""
    stamp = name.removeprefix("seg-").split("-", 1)[0].removesuffix("Z")
    seconds, _, fraction = stamp.partition(".")
    try:
        whole = calendar.timegm(time.strptime(seconds, VERSION_TIME_FORMAT))
    except ValueError:
        return None
    if fraction and not (fraction.isascii() and fraction.isdigit()):
        return None
    return whole + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def _folders_under(keys: Sequence[str], top: str) -> set[str]:
    return {key.split("/")[1] for key in keys if key.startswith(f"{top}/") and key.count("/") >= 2}


def list_versions(store: Store, keys: Sequence[str] | None = None) -> list[VersionInfo]:
    """Every version folder under versions/ (format 3 and 2), oldest first (by publish time, then name)."""
    names = _folders_under(list(store.iter_keys()) if keys is None else keys, VERSIONS)
    infos = [VersionInfo(name, version_time(name)) for name in names]
    return sorted(infos, key=lambda info: (info.published or 0.0, info.name))


def versions_to_delete(
    versions: Sequence[VersionInfo],
    current: str,
    now: float,
    policy: RetentionPolicy,
    identities: Mapping[str, Hashable] | None = None,
    parent_of_current: str | None = None,
) -> list[str]:
    """The names retention may delete (see the module docstring for the rule); pure, oldest first.

    `identities` maps a version to its model identity (versions missing from it have none known).
    `parent_of_current`: the version CURRENT's version was planned on, i.e. the one it replaced; kept
    like the one before it by name (they differ when a crashed build left a version file CURRENT never
    named).
    """
    ordered = sorted((v for v in versions if v.published is not None), key=lambda v: (v.published, v.name))
    keep = {current} | ({parent_of_current} if parent_of_current else set())
    names = [v.name for v in ordered]
    if current in names and names.index(current) > 0:
        keep.add(names[names.index(current) - 1])
    keep.update(names[-policy.keep_versions :])
    for version, successor in itertools.pairwise(ordered):
        retired_at = successor.published
        assert retired_at is not None  # filtered above
        if now - retired_at < policy.retention_s:
            keep.add(version.name)
    newest_of: dict[Hashable, str] = {}
    for name in names:  # oldest first: the last one seen of an identity is its newest
        if identities is not None and name in identities:
            newest_of[identities[name]] = name
    keep.update(newest_of.values())
    # Versions whose name carries no time are never deleted: nothing says when they were current.
    return [name for name in names if name not in keep]


def segments_to_delete(
    segments: Iterable[str], referenced: Iterable[str], now: float, policy: RetentionPolicy
) -> list[str]:
    """Segments no kept version names and old enough that no build in progress is writing them; pure."""
    named = set(referenced)
    doomed = []
    for name in sorted(set(segments) - named):
        created = version_time(name)
        if created is not None and now - created >= policy.segment_grace_s:
            doomed.append(name)
    return doomed


def _identity(store: Store, name: str) -> Hashable | None:
    """A version's model identity, from its version file (format 3) or manifest (format 2); None if unreadable."""
    try:
        if store.exists(f"{VERSIONS}/{name}/{VERSION_FILE}"):
            return read_version(store, name).identity
        data = json.loads(store.read_bytes(f"{VERSIONS}/{name}/{MANIFEST_FILE}"))
        return (
            str(data["model_fingerprint"]),
            int(data["embedding_dim"]),
            json.dumps(data["preprocessing"], sort_keys=True),
            str(data.get("precision", "fp32")),
        )
    except (ArtifactError, StoreError, ValueError, KeyError, TypeError) as exc:
        logger.warning("cannot read index version %s at %s to retain by model: %s", name, store.uri, exc)
        return None


def prune(store: Store, current: str, policy: RetentionPolicy, now: float) -> tuple[list[str], list[str]]:
    """Delete what retention allows: (versions, segments) deleted; every failure is a logged warning."""
    try:
        keys = list(store.iter_keys())
        versions = list_versions(store, keys)
        identities = {v.name: ident for v in versions if (ident := _identity(store, v.name)) is not None}
        parent = read_version(store, current).parent if f"{VERSIONS}/{current}/{VERSION_FILE}" in keys else None
        doomed = versions_to_delete(versions, current, now, policy, identities, parent)
    except Exception as exc:  # a listing error must not fail a build that has published
        logger.warning("could not list old index versions at %s to prune them: %s", store.uri, exc)
        return [], []
    deleted = []
    for name in doomed:
        try:
            store.delete_prefix(version_folder(name))
            deleted.append(name)
        except Exception as exc:
            logger.warning("could not delete old index version %s at %s: %s", name, store.uri, exc)
    referenced: set[str] = set()
    for info in versions:
        if info.name in deleted or not any(k.startswith(f"{VERSIONS}/{info.name}/{VERSION_FILE}") for k in keys):
            continue
        try:
            referenced.update(read_version(store, info.name).segment_names)
        except Exception as exc:
            logger.warning("cannot read kept version %s at %s: no segment is deleted (%s)", info.name, store.uri, exc)
            return deleted, []
    deleted_segments = []
    for name in segments_to_delete(_folders_under(keys, SEGMENTS), referenced, now, policy):
        try:
            store.delete_prefix(f"{SEGMENTS}/{name}")
            deleted_segments.append(name)
        except Exception as exc:
            logger.warning("could not delete unused segment %s at %s: %s", name, store.uri, exc)
    return deleted, deleted_segments


def prune_versions(store: Store, current: str, policy: RetentionPolicy, now: float) -> list[str]:
    """The versions `prune` deleted (segments no kept version names go with them)."""
    return prune(store, current, policy, now)[0]


# --- reading; below read_current: format 2 (legacy), still read by the serving code and by --full ---


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
    manifest: Manifest  # the version as one format-2-shaped view: live records sorted by key
    index: faiss.Index  # one exact in-memory index over the live vectors, under their ids
    location: str  # the concrete version folder it was read from
    version: Version | None = None


def version_manifest(version: Version, records: Sequence[Any]) -> Manifest:
    """A version as one manifest-shaped view (tools, tests, the builder's diff): its live records."""
    largest = max(version.segments, key=lambda s: s.count, default=None)
    index = dict(largest.index) if largest is not None else {"factory": "Flat", "params": {}}
    return Manifest(
        model=version.model,
        model_fingerprint=version.model_fingerprint,
        embedding_dim=version.embedding_dim,
        preprocessing=version.preprocessing,
        index={**index, "segments": len(version.segments)},
        source=version.source,
        records=tuple(records),
        index_sha256="",
        created_at=version.created_at,
        next_id=version.next_id,
        precision=version.precision,
        metric=version.metric,
        format_version=version.format_version,
        skipped=version.skipped,
    )


def load_artifact(store: Store, name: str | None = None, cache_dir: Path = DEFAULT_CACHE_DIR) -> LoadedArtifact:
    """Read and check a whole version (CURRENT's by default); every inconsistency is an ArtifactError."""
    try:
        name = read_current(store) if name is None else name.rsplit("/", 1)[-1]
        contents = read_contents(store, read_version(store, name))
        records = contents.live()
        version = contents.version
        ids, rows = [], []
        for segment in version.segments:
            dead = set(version.deleted_ids(segment.name))
            vectors = open_segment_vectors(store, segment, cache_dir)
            for row, record in enumerate(contents.records[segment.name]):
                if record.id not in dead:
                    ids.append(record.id)
                    rows.append(np.asarray(vectors[row]))
    except StoreError as exc:
        raise ArtifactError(f"the index at {store.uri} is incomplete: {exc}") from exc
    matrix = np.stack(rows) if rows else np.zeros((0, version.embedding_dim), dtype=np.float32)
    index = build_faiss_index(matrix, IndexSpec("Flat"), np.asarray(ids, dtype=np.int64))
    return LoadedArtifact(
        manifest=version_manifest(version, records),
        index=index,
        location=_join(store.uri, version_folder(name)),
        version=version,
    )
