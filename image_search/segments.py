"""The v3 index format: versions made of immutable segments plus deletions (format and I/O of one piece each).

Layout under an index root (the builder's `--out`):

    segments/<segment>/index.faiss     IndexIDMap2 over the segment's vectors, under their stable ids
    segments/<segment>/vectors.npy     the same vectors, raw float32 (n, dim), row i <-> records[i]
                                       (np.load(mmap_mode="r") friendly; compaction and re-training read it)
    segments/<segment>/records.json    {"format_version": 3, "records": [ImageRecord...]} in row order
    versions/<version>/version.json    a Version (below)
    CURRENT                            the published version's name, one line, written last

A segment is written once and never changed. A version names its segments (with the sha256 and size
of each file, the vector count and the FAISS index spec), and says which ids of which segment are
dead: `deleted[segment] = [ids]`. Deletions are per segment because an edited image keeps its id and
gets its new vector in a NEW segment ("id 7 of segment S1 is dead, id 7 of S2 is live"). An id is
live in at most one segment of a version.

Records are immutable with their segment. When only a record's metadata changes and its vector does
not (a file moved, detected by its hash; a touched file whose new stat data is recorded), the
version carries the new record in `overrides` (keyed by id) instead of copying the vector into a new
segment: publishing such a change reads and writes no vectors. The record of a live id is
`overrides[id]` if present, else the one in its segment's records.json. An override is dropped when
its id gets a new vector or is removed, and compaction folds overrides into the merged segment.

Other fields of a version: `next_id` (one past the highest id ever given; ids are never reused),
`format_version` (3), model, model_fingerprint, embedding_dim, preprocessing, precision, metric,
source (the collection root the keys are relative to), skipped, `parent` (the version this one was
planned on, None for the first), created_at.

Names: a segment is `seg-<UTC time>-<random>`, a version `<UTC time>-<random>` (see
`artifact.new_version_name`); both sort by creation time.

Publishing (`build_segment`, then `commit_version`): upload the new segment's files and read each
back (streamed sha256; on a local store they are written in `segments/<name>.tmp/`, synced, hashed
and renamed into place, so nothing is copied),
write version.json and read it back, check that CURRENT still names `parent` (another builder did not
publish meanwhile), then write CURRENT and read it back. A crash at any point leaves CURRENT, and so
the previous version with all its segments, untouched. So publishing a change writes the new
segment, one version file and CURRENT: bytes and time follow the change, not the collection.

Errors: an I/O failure is a `StoreError` (retryable: the store could not be read); a version or
segment that is malformed, of another format or fails its checksum is an `ArtifactError` (broken).
A v2 index (`versions/<v>/manifest.json`, one whole index) is refused with `LegacyFormatError`
saying to rebuild with `--full`; the builder's --full reads its records to keep the ids.

API summary (names others code against):
- `FORMAT_VERSION`, `SEGMENTS`, `VERSIONS`, `POINTER`, `INDEX_FILE`, `VECTORS_FILE`, `RECORDS_FILE`,
  `VERSION_FILE`, `segment_folder(name)`, `version_file(name)`
- `FileInfo`, `SegmentInfo` (name, count, dim, index, files, created_at), `Version` (see fields;
  `live_count`, `deleted_ids(segment)`, `segment_names`, `to_json`/`from_json`)
- `new_segment_name()`, `write_segment_files(folder, ids, vectors, records, spec) -> (files, tuned spec)`,
  `upload_segment(store, name, folder, files, count, dim, spec) -> SegmentInfo`,
  `build_segment(store, ids, vectors, records, dim, spec=None) -> SegmentInfo` (both steps)
- `read_pointer(store) -> str | None`, `read_version(store, name) -> Version`,
  `read_current_version(store) -> Version | None` (None only when CURRENT does not exist)
- `read_segment_records(store, segment) -> tuple[ImageRecord, ...]` (checked against the sha256)
- `local_segment_file(store, segment, file, cache_dir) -> Path` (verified; S3 cached per node under
  `cache_dir/<store hash>/segments/<segment>/<file>`), `open_segment_index(...)` (memory-mapped),
  `open_segment_vectors(...)` (np.memmap, read-only)
- `live_records(version, records_by_segment) -> list[ImageRecord]` (overrides applied, sorted by key)
- `commit_version(store, version)`: version.json then CURRENT, as above
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from image_search.errors import ArtifactError
from image_search.faiss_index import build_faiss_index, map_index_file, write_index_file
from image_search.index_spec import DEFAULT_RECALL_TARGET, IndexSpec, choose_index_spec
from image_search.manifest import METRIC, ImageRecord, check_records
from image_search.recall_tuning import search_knob, tune_recall, with_tuned_params
from image_search.storage import Store, StoreError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3
SEGMENTS = "segments"
VERSIONS = "versions"
POINTER = "CURRENT"
INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.npy"
RECORDS_FILE = "records.json"
VERSION_FILE = "version.json"
LEGACY_MANIFEST_FILE = "manifest.json"  # format 2: versions/<v>/manifest.json + index.faiss
SEGMENT_FILES = (INDEX_FILE, VECTORS_FILE, RECORDS_FILE)
NAME_TIME_FORMAT = "%Y%m%dT%H%M%S"
HASH_CHUNK_BYTES = 8 * 1024 * 1024
REBUILD_HINT = "rebuild it with `python -m index_builder --images SRC --out DST --full`"


class LegacyFormatError(ArtifactError):
    """The index root holds a format-2 index (one whole FAISS index per version)."""


def segment_folder(name: str) -> str:
    return f"{SEGMENTS}/{name}"


def version_file(name: str) -> str:
    return f"{VERSIONS}/{name}/{VERSION_FILE}"


def new_segment_name(now: float | None = None) -> str:
    """Sortable by creation time (retention keeps young segments a running build may be writing)."""
    seconds, micros = divmod(int((time.time() if now is None else now) * 1_000_000), 1_000_000)
    return f"seg-{time.strftime(NAME_TIME_FORMAT, time.gmtime(seconds))}.{micros:06d}Z-{uuid.uuid4().hex[:8]}"


def _valid_name(name: str) -> bool:
    return bool(name) and "/" not in name and not name.startswith(".") and len(name) <= 200


# --- the data ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileInfo:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class SegmentInfo:
    name: str
    count: int  # vectors stored (live and deleted): rows of vectors.npy, records of records.json
    dim: int
    index: dict[str, Any]  # IndexSpec.to_dict() of index.faiss
    files: dict[str, FileInfo]  # for each of SEGMENT_FILES
    created_at: str = ""

    @property
    def spec(self) -> IndexSpec:
        return IndexSpec.from_dict(self.index)

    @property
    def bytes(self) -> int:
        return sum(info.bytes for info in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SegmentInfo:
        files = {str(name): FileInfo(str(info["sha256"]), int(info["bytes"])) for name, info in data["files"].items()}
        if set(files) != set(SEGMENT_FILES):
            raise ArtifactError(f"segment {data.get('name')!r} lists files {sorted(files)}, not {list(SEGMENT_FILES)}")
        info = cls(
            name=str(data["name"]),
            count=int(data["count"]),
            dim=int(data["dim"]),
            index=dict(data["index"]),
            files=files,
            created_at=str(data.get("created_at", "")),
        )
        if not _valid_name(info.name) or info.count < 0:
            raise ArtifactError(f"invalid segment entry {info.name!r} (count {info.count})")
        return info


@dataclass(frozen=True)
class Version:
    name: str
    model: str
    model_fingerprint: str
    embedding_dim: int
    preprocessing: dict[str, Any]
    precision: str
    source: str
    segments: tuple[SegmentInfo, ...]  # oldest first
    deleted: dict[str, tuple[int, ...]]  # segment name -> its dead ids, sorted; only segments with any
    next_id: int
    overrides: tuple[ImageRecord, ...] = ()  # records replacing their segment's stored one, sorted by id
    skipped: tuple[dict[str, str], ...] = ()
    parent: str | None = None
    created_at: str = ""
    metric: str = METRIC
    format_version: int = FORMAT_VERSION

    @property
    def segment_names(self) -> tuple[str, ...]:
        return tuple(segment.name for segment in self.segments)

    def deleted_ids(self, segment: str) -> tuple[int, ...]:
        return self.deleted.get(segment, ())

    @property
    def live_count(self) -> int:
        return sum(segment.count - len(self.deleted_ids(segment.name)) for segment in self.segments)

    @property
    def count(self) -> int:
        return self.live_count

    @property
    def identity(self) -> tuple[str, int, str, str]:
        """What the vectors depend on: versions with another identity cannot be mixed or served by this model."""
        return (
            self.model_fingerprint,
            self.embedding_dim,
            json.dumps(self.preprocessing, sort_keys=True),
            self.precision,
        )

    def to_json(self) -> str:
        data = asdict(self)
        data["segments"] = [segment.to_dict() for segment in self.segments]
        data["deleted"] = {name: list(ids) for name, ids in sorted(self.deleted.items())}
        data["live_count"] = self.live_count
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Version:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{VERSION_FILE} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ArtifactError(f"{VERSION_FILE} must hold a JSON object")
        if data.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"index format_version {data.get('format_version')!r} is not supported (this version reads "
                f"{FORMAT_VERSION}); use the index_builder that wrote it, or {REBUILD_HINT}"
            )
        try:
            version = cls(
                name=str(data["name"]),
                model=str(data["model"]),
                model_fingerprint=str(data["model_fingerprint"]),
                embedding_dim=int(data["embedding_dim"]),
                preprocessing=dict(data["preprocessing"]),
                precision=str(data["precision"]),
                source=str(data["source"]),
                segments=tuple(SegmentInfo.from_dict(segment) for segment in data["segments"]),
                deleted={str(name): tuple(sorted(int(i) for i in ids)) for name, ids in data["deleted"].items()},
                next_id=int(data["next_id"]),
                overrides=tuple(ImageRecord(**record) for record in data.get("overrides", ())),
                skipped=tuple(data.get("skipped", ())),
                parent=None if data.get("parent") is None else str(data["parent"]),
                created_at=str(data.get("created_at", "")),
                metric=str(data.get("metric", METRIC)),
            )
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"{VERSION_FILE} is incomplete or malformed: {exc!r}") from exc
        version.check()
        if data.get("live_count", version.live_count) != version.live_count:
            raise ArtifactError(
                f"{VERSION_FILE} says live_count {data['live_count']}, its segments hold {version.live_count}"
            )
        return version

    def check(self) -> None:
        """What can be checked without reading segments: names unique, deletions name listed segments."""
        names = self.segment_names
        if len(set(names)) != len(names):
            raise ArtifactError(f"version {self.name} lists a segment twice")
        unknown = set(self.deleted) - set(names)
        if unknown:
            raise ArtifactError(f"version {self.name} deletes ids of segments it does not list: {sorted(unknown)}")
        for segment in self.segments:
            if len(set(self.deleted_ids(segment.name))) > segment.count or segment.dim != self.embedding_dim:
                raise ArtifactError(f"version {self.name}: segment {segment.name} does not fit (count/dim)")
        override_ids = [record.id for record in self.overrides]
        if len(set(override_ids)) != len(override_ids):
            raise ArtifactError(f"version {self.name} overrides one id twice")
        if override_ids and (min(override_ids) < 0 or max(override_ids) >= self.next_id):
            raise ArtifactError(f"version {self.name} overrides ids outside 0..next_id-1")


def live_records(version: Version, records_by_segment: Mapping[str, Sequence[ImageRecord]]) -> list[ImageRecord]:
    """Every live record of the version (overrides applied), sorted by key; checks ids and keys are unique."""
    overrides = {record.id: record for record in version.overrides}
    live: list[ImageRecord] = []
    for segment in version.segments:
        dead = set(version.deleted_ids(segment.name))
        for record in records_by_segment[segment.name]:
            if record.id not in dead:
                live.append(overrides.get(record.id, record))
    live.sort(key=lambda record: record.key)
    check_records(tuple(live), version.next_id)
    live_ids = {record.id for record in live}
    if not set(overrides) <= live_ids:
        raise ArtifactError(
            f"version {version.name} overrides ids that are not live: {sorted(set(overrides) - live_ids)[:5]}"
        )
    return live


# --- hashing and checks -----------------------------------------------------------------------------------


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


def _segment_key(segment: str, file: str) -> str:
    return f"{segment_folder(segment)}/{file}"


def _corrupt(store: Store, segment: str, file: str) -> ArtifactError:
    return ArtifactError(
        f"{_segment_key(segment, file)} at {store.uri} is corrupt: its checksum does not match the version file; "
        f"{REBUILD_HINT}"
    )


# --- writing ----------------------------------------------------------------------------------------------


_RECORD_FIELDS = tuple(f.name for f in fields(ImageRecord))


def records_json(records: Sequence[ImageRecord]) -> bytes:
    # Not dataclasses.asdict: it deep-copies every field (6 s for 110k records on this machine, a
    # compaction at 1M paid it ten times over); the fields are plain ints and strings.
    rows = [{name: getattr(record, name) for name in _RECORD_FIELDS} for record in records]
    return (json.dumps({"format_version": FORMAT_VERSION, "records": rows}) + "\n").encode()


def write_segment_files(
    folder: Path,
    ids: np.ndarray,
    vectors: np.ndarray,
    records: Sequence[ImageRecord],
    spec: IndexSpec,
    centroids: np.ndarray | None = None,
) -> tuple[dict[str, FileInfo], IndexSpec]:
    """Write a segment's three files into a local folder; their checksums and the spec with tuned search
    params (see tune_segment). Rows, ids and records align."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not (len(ids) == len(vectors) == len(records)) or [r.id for r in records] != ids.tolist():
        raise ValueError("a segment's ids, vectors and records must align row for row")
    if len(ids) == 0:
        raise ValueError("a segment holds at least one vector")
    folder.mkdir(parents=True, exist_ok=True)
    index = build_faiss_index(vectors, spec, ids, centroids)
    tuned = tune_segment(index, vectors, ids, spec)
    write_index_file(index, folder / INDEX_FILE)
    del index
    # FAISS reports a failed write (a full disk) only on stderr: map the file back before it is published.
    try:
        written = map_index_file(folder / INDEX_FILE)
    except RuntimeError as exc:
        raise ArtifactError(f"the index file written to {folder} does not read back: {exc}") from exc
    if written.ntotal != len(ids) or written.d != vectors.shape[1]:
        raise ArtifactError(f"the index file written to {folder} holds {written.ntotal} x {written.d} vectors")
    del written
    np.save(folder / VECTORS_FILE, vectors, allow_pickle=False)
    (folder / RECORDS_FILE).write_bytes(records_json(records))
    files = {name: FileInfo(file_sha256(folder / name), (folder / name).stat().st_size) for name in SEGMENT_FILES}
    return files, tuned


def tune_segment(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, spec: IndexSpec) -> IndexSpec:
    """An approximate segment's spec with its search knob tuned on its own vectors (recall@10 >= the
    target, at the lowest latency), the measured recall and latency under params["tuning"]; an exact
    segment's spec as it is (it needs no tuning: recall 1.0)."""
    if search_knob(index)[0] is None:
        return spec
    result = tune_recall(index, vectors, ids, target=float(spec.params.get("recall_target", DEFAULT_RECALL_TARGET)))
    if not result.met:
        logger.warning(
            "segment index %s reaches recall@%d %.3f at best (%s %s), below the target %.2f",
            spec.factory,
            result.k,
            result.recall,
            result.param,
            result.value,
            result.target,
        )
    tuned = with_tuned_params(spec, result)
    return IndexSpec(tuned.factory, {**tuned.params, "tuning": result.to_dict()}, reason=tuned.reason)


def upload_segment(
    store: Store, name: str, folder: Path, files: Mapping[str, FileInfo], count: int, dim: int, spec: IndexSpec
) -> SegmentInfo:
    """Copy a written segment folder to the store and read every file back (streamed sha256)."""
    for file in SEGMENT_FILES:
        store.write_file(_segment_key(name, file), folder / file)
    for file in SEGMENT_FILES:
        if store_sha256(store, _segment_key(name, file)) != files[file].sha256:
            raise ArtifactError(f"{store.uri}/{_segment_key(name, file)} does not read back as written")
    return SegmentInfo(
        name=name,
        count=count,
        dim=dim,
        index=spec.to_dict(),
        files=dict(files),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def build_segment(
    store: Store,
    ids: np.ndarray,
    vectors: np.ndarray,
    records: Sequence[ImageRecord],
    dim: int,
    spec: IndexSpec | None = None,
    name: str | None = None,
    centroids: np.ndarray | None = None,
) -> SegmentInfo:
    """Index, write and upload one new segment; its index is the one its size calls for unless `spec` says.

    On a local store the files are written in `segments/<name>.tmp/` and that folder is renamed into
    place once every file is synced and hashed: no copy (a crash leaves only the .tmp folder, which
    retention removes like any unreferenced segment). Elsewhere they are written to a temporary
    folder, uploaded and read back.
    """
    spec = spec or choose_index_spec(len(ids), dim)
    name = name or new_segment_name()
    target = store.local_path(segment_folder(name))
    if target is None:
        with tempfile.TemporaryDirectory(prefix="segment-") as work:
            folder = Path(work) / name
            files, spec = write_segment_files(folder, ids, vectors, records, spec, centroids)
            return upload_segment(store, name, folder, files, len(ids), dim, spec)
    work_folder = target.with_name(f"{name}.tmp")
    try:
        files, spec = write_segment_files(work_folder, ids, vectors, records, spec, centroids)
        for file in SEGMENT_FILES:
            with (work_folder / file).open("rb") as handle:
                os.fsync(handle.fileno())
        os.rename(work_folder, target)
        parent = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(parent)
        finally:
            os.close(parent)
    except OSError as exc:
        raise StoreError(f"cannot write segment {target}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(work_folder, ignore_errors=True)
    return SegmentInfo(
        name=name,
        count=len(ids),
        dim=dim,
        index=spec.to_dict(),
        files=files,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def commit_version(store: Store, version: Version, before_pointer: Callable[[], None] | None = None) -> None:
    """Write the version file (read back), check CURRENT still names `version.parent`, then write CURRENT.

    The parent check keeps a build planned on an older version from hiding another's publish; it is a
    read-then-write, not a lock (two commits in the same instant are the commit lock's job).
    """
    if not _valid_name(version.name):
        raise ValueError(f"invalid version name {version.name!r}")
    text = version.to_json()
    store.write_bytes(version_file(version.name), text.encode())
    if store.read_bytes(version_file(version.name)).decode() != text:
        raise ArtifactError(f"{store.uri}/{version_file(version.name)} does not read back as written")
    if before_pointer is not None:
        before_pointer()
    current = read_pointer(store)
    if current != version.parent:
        raise ArtifactError(
            f"{store.uri}/{POINTER} moved from {version.parent} to {current} while this version was made "
            "(another builder published); run the build again"
        )
    store.write_bytes(POINTER, (version.name + "\n").encode())
    if read_pointer(store) != version.name:
        raise ArtifactError(f"{store.uri}/{POINTER} does not read back as written")


# --- reading ----------------------------------------------------------------------------------------------


def read_pointer(store: Store) -> str | None:
    """The version CURRENT names; None only when there is no CURRENT (StoreError when it cannot be told)."""
    if not store.exists(POINTER):
        return None
    try:
        name = store.read_bytes(POINTER).decode().strip()
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{store.uri}/{POINTER} is not text") from exc
    if not _valid_name(name):
        raise ArtifactError(f"{store.uri}/{POINTER} holds an invalid version name {name[:80]!r}")
    return name


def is_legacy_version(store: Store, name: str) -> bool:
    return store.exists(f"{VERSIONS}/{name}/{LEGACY_MANIFEST_FILE}")


def read_version(store: Store, name: str) -> Version:
    """The version file of `name`; StoreError if it cannot be read, ArtifactError if it is not a good v3 version."""
    try:
        data = store.read_bytes(version_file(name))
    except StoreError:
        if is_legacy_version(store, name):
            raise LegacyFormatError(
                f"the index at {store.uri} (version {name}) is format 2, one whole index per version; "
                f"this version reads format {FORMAT_VERSION} (segments): {REBUILD_HINT}"
            ) from None
        raise
    version = Version.from_json(data)
    if version.name != name:
        raise ArtifactError(f"{store.uri}/{version_file(name)} is the version file of {version.name}")
    return version


def read_current_version(store: Store) -> Version | None:
    """CURRENT's version; None only when nothing was ever published (no CURRENT). Errors propagate."""
    name = read_pointer(store)
    return None if name is None else read_version(store, name)


def read_segment_records(store: Store, segment: SegmentInfo) -> tuple[ImageRecord, ...]:
    """The segment's records in row order, checked against the version's sha256 of records.json."""
    data = store.read_bytes(_segment_key(segment.name, RECORDS_FILE))
    if hashlib.sha256(data).hexdigest() != segment.files[RECORDS_FILE].sha256:
        raise _corrupt(store, segment.name, RECORDS_FILE)
    try:
        parsed = json.loads(data)
        if parsed.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{_segment_key(segment.name, RECORDS_FILE)} is not format {FORMAT_VERSION}")
        records = tuple(ImageRecord(**record) for record in parsed["records"])
    except ArtifactError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{_segment_key(segment.name, RECORDS_FILE)} at {store.uri} is malformed: {exc!r}") from exc
    if len(records) != segment.count:
        raise ArtifactError(f"segment {segment.name} lists {len(records)} records, its version says {segment.count}")
    return records


def cache_path(cache_dir: Path, store: Store, segment: str, file: str) -> Path:
    """Where a node keeps its copy of a remote segment's file."""
    store_hash = hashlib.sha256(store.uri.encode()).hexdigest()[:16]
    return Path(cache_dir) / store_hash / SEGMENTS / segment / file


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


def local_segment_file(store: Store, segment: SegmentInfo, file: str, cache_dir: Path, verify: bool = True) -> Path:
    """A verified local copy of one segment file: the store's own file, or the node's cached copy.

    StoreError: the store could not be read (retry); ArtifactError: the file does not match its checksum;
    OSError: the cache folder cannot be written.
    """
    expected = segment.files[file].sha256
    key = _segment_key(segment.name, file)
    own = store.local_path(key)
    if own is not None:
        try:
            if verify and file_sha256(own) != expected:
                raise _corrupt(store, segment.name, file)
        except FileNotFoundError as exc:
            raise StoreError(f"cannot read {own}: {exc.strerror}") from exc
        return own
    target = cache_path(cache_dir, store, segment.name, file)
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / ".lock").open("w") as lock:
        # One download per node: other processes wait here, then find the file and only verify it.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            if not verify or file_sha256(target) == expected:
                return target
            logger.warning("cached segment file %s does not match its checksum; fetching it again", target)
            target.unlink()
        if not _download(store, key, target, expected):
            raise _corrupt(store, segment.name, file)
        return target


def open_segment_index(store: Store, segment: SegmentInfo, cache_dir: Path) -> faiss.Index:
    """The segment's FAISS index, checked and memory-mapped from a local file."""
    path = local_segment_file(store, segment, INDEX_FILE, cache_dir)
    try:
        index = map_index_file(path)
    except RuntimeError as exc:
        raise ArtifactError(
            f"{_segment_key(segment.name, INDEX_FILE)} at {store.uri} is not a FAISS index: {exc}"
        ) from exc
    if index.ntotal != segment.count or index.d != segment.dim:
        raise ArtifactError(
            f"segment {segment.name} at {store.uri} holds {index.ntotal} vectors of dim {index.d}, "
            f"its version lists {segment.count} of dim {segment.dim}"
        )
    return index


def open_segment_vectors(store: Store, segment: SegmentInfo, cache_dir: Path) -> np.ndarray:
    """The segment's raw vectors (n, dim) float32, memory-mapped read-only from a checked local file."""
    path = local_segment_file(store, segment, VECTORS_FILE, cache_dir)
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ArtifactError(f"{_segment_key(segment.name, VECTORS_FILE)} at {store.uri} is not a .npy: {exc}") from exc
    if vectors.shape != (segment.count, segment.dim) or vectors.dtype != np.float32:
        raise ArtifactError(f"segment {segment.name} vectors are {vectors.shape} {vectors.dtype}, not what it lists")
    return vectors


@dataclass(frozen=True)
class VersionContents:
    """A version with every segment's records read (what the builder diffs against)."""

    version: Version
    records: dict[str, tuple[ImageRecord, ...]] = field(default_factory=dict)

    def live(self) -> list[ImageRecord]:
        return live_records(self.version, self.records)

    def segment_of(self) -> dict[int, str]:
        """id -> the segment holding its live vector."""
        where: dict[int, str] = {}
        for segment in self.version.segments:
            dead = set(self.version.deleted_ids(segment.name))
            for record in self.records[segment.name]:
                if record.id not in dead:
                    where[record.id] = segment.name
        return where


def read_contents(store: Store, version: Version) -> VersionContents:
    return VersionContents(version, {s.name: read_segment_records(store, s) for s in version.segments})


def with_changes(
    version: Version,
    *,
    name: str,
    add: Sequence[SegmentInfo] = (),
    drop: Sequence[str] = (),
    delete: Mapping[str, Sequence[int]] | None = None,
    overrides: Sequence[ImageRecord] | None = None,
    **fields: Any,
) -> Version:
    """The next version planned on `version`: segments dropped and added, ids deleted (per segment)."""
    dropped = set(drop)
    deleted = {seg: set(ids) for seg, ids in version.deleted.items() if seg not in dropped}
    for seg, ids in (delete or {}).items():
        if seg in dropped:
            continue
        deleted.setdefault(seg, set()).update(ids)
    segments = tuple(s for s in version.segments if s.name not in dropped) + tuple(add)
    return replace(
        version,
        name=name,
        segments=segments,
        deleted={seg: tuple(sorted(ids)) for seg, ids in deleted.items() if ids},
        overrides=version.overrides if overrides is None else tuple(sorted(overrides, key=lambda r: r.id)),
        parent=version.name,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
    )
