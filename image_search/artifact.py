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
import hashlib
import itertools
import json
import logging
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
from image_search.faiss_index import build_faiss_index
from image_search.index_spec import IndexSpec
from image_search.manifest import Manifest
from image_search.segments import (
    SEGMENTS,
    VERSION_FILE,
    Version,
    commit_version,
    open_segment_vectors,
    read_contents,
    read_version,
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


@dataclass(frozen=True)
class VersionFacts:
    """What retention reads of one version file: its model identity and the segments it names."""

    identity: Hashable | None
    segment_names: tuple[str, ...] | None  # None: not a readable format-3 version file


class VersionFactsCache:
    """Version files never change once written, so a process that prunes often (the Writer, every few
    seconds) reads each one once instead of every version on every prune."""

    def __init__(self) -> None:
        self.facts: dict[tuple[str, str], VersionFacts] = {}

    def get(self, store: Store, name: str) -> VersionFacts:
        key = (store.uri, name)
        found = self.facts.get(key)
        if found is None:
            found = _version_facts(store, name)
            if found.identity is not None and found.segment_names is not None:  # unreadable: try again next time
                self.facts[key] = found
        return found

    def forget(self, store: Store, names: Iterable[str]) -> None:
        for name in names:
            self.facts.pop((store.uri, name), None)


def _version_facts(store: Store, name: str) -> VersionFacts:
    identity = _identity(store, name)
    try:
        names = read_version(store, name).segment_names if store.exists(f"{VERSIONS}/{name}/{VERSION_FILE}") else ()
    except Exception as exc:
        logger.warning("cannot read kept version %s at %s: %s", name, store.uri, exc)
        return VersionFacts(identity, None)
    return VersionFacts(identity, names)


def prune(
    store: Store, current: str, policy: RetentionPolicy, now: float, facts: VersionFactsCache | None = None
) -> tuple[list[str], list[str]]:
    """Delete what retention allows: (versions, segments) deleted; every failure is a logged warning.
    `facts`: a cache of what was read of version files, kept across calls by a process that prunes often."""
    facts = facts or VersionFactsCache()
    try:
        keys = list(store.iter_keys())
        versions = list_versions(store, keys)
        identities = {v.name: ident for v in versions if (ident := facts.get(store, v.name).identity) is not None}
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
    facts.forget(store, deleted)
    version_files = {k for k in keys if k.endswith(f"/{VERSION_FILE}")}
    referenced: set[str] = set()
    for info in versions:
        if info.name in deleted or f"{VERSIONS}/{info.name}/{VERSION_FILE}" not in version_files:
            continue
        names = facts.get(store, info.name).segment_names
        if names is None:
            logger.warning("kept version %s at %s is unreadable: no segment is deleted", info.name, store.uri)
            return deleted, []
        referenced.update(names)
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


def load_manifest(store: Store, folder: str) -> Manifest:
    try:
        return Manifest.from_json(store.read_bytes(_join(folder, MANIFEST_FILE)))
    except StoreError as exc:
        raise ArtifactError(f"the index at {store.uri} is incomplete: {exc}") from exc


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
