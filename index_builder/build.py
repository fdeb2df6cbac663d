"""Build an index artifact from a collection of images: list, diff, embed what changed, index, publish.

Shared by both engines; an engine only turns keys into (records, vectors, skipped):

    collection = open_collection(images, out)           list the images (key, size, mtime)
    plan = plan_build(collection, model, full=...)      diff against the published manifest, reuse vectors
    records, vectors, skipped = <engine>(plan.diff.to_embed)
    report = finish_build(plan, records, vectors, skipped, started)

Builds are incremental by default: unchanged images keep their stored vectors, reconstructed from
the published index (every index this project builds stores vectors uncompressed, Flat or
IVF-Flat, so the reconstruction is exact and nothing has to be stored beside the index; the
service maps the index and nothing else). A lossy index, another model (fingerprint), embedding
dim, preprocessing, precision or manifest format forces a complete rebuild, said in
`BuildPlan.full_reason`. Even a complete rebuild keeps the published ids of the images still there.

When nothing changed (no image added, changed or removed, the same skipped files) no version is
published: the service has nothing to swap to and retention has nothing to do.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from image_search.artifact import (
    RetentionPolicy,
    file_sha256,
    load_manifest,
    open_index,
    publish,
    read_current,
    store_sha256,
    version_folder,
)
from image_search.decoding import IMAGE_EXTENSIONS
from image_search.errors import ArtifactError
from image_search.faiss_index import (
    build_faiss_index,
    map_index_file,
    reconstruct_vectors,
    stores_exact_vectors,
    write_index_file,
)
from image_search.index_spec import IndexSpec, choose_index_spec
from image_search.manifest import ImageRecord, Manifest
from image_search.storage import Entry, Store, StoreError, open_store
from index_builder.diff import CollectionDiff, assign_ids, diff_collection, full_diff, keys_to_hash
from index_builder.listing import list_images


class BuildError(Exception):
    """The build cannot proceed; the message is the one-line reason shown to the user."""


def discover_images(store: Store) -> list[Entry]:
    """Every image file under the store, by extension, sorted by key; hidden files and names that
    are not UTF-8 left out (see index_builder.listing)."""
    return list_images(store).entries


@dataclass(frozen=True)
class Collection:
    """Where a build reads from and writes to, and the images it found."""

    source: Store
    out: Store
    entries: list[Entry]
    skipped: tuple[tuple[str, str], ...] = ()  # found but not indexable (names not UTF-8), with the reason

    @property
    def keys(self) -> list[str]:
        return [entry.key for entry in self.entries]


def open_collection(images: str, out: str) -> Collection:
    """Both locations of a build (folders or s3:// prefixes) and the images found; none is an error."""
    source = open_store(images)
    listing = list_images(source)  # a folder or prefix that cannot be listed raises StoreError: no guessing
    if not listing.entries:
        raise BuildError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {source.uri}")
    return Collection(source=source, out=open_store(out), entries=listing.entries, skipped=tuple(listing.skipped))


@dataclass(frozen=True)
class ModelInfo:
    """What the vectors of a build depend on: the model's identity, preprocessing and precision."""

    name: str
    fingerprint: str
    embedding_dim: int
    preprocessing: dict
    precision: str


@dataclass(frozen=True)
class BuildPlan:
    collection: Collection
    model: ModelInfo
    diff: CollectionDiff
    previous: Manifest | None
    previous_version: str | None
    next_id: int
    reused_vectors: np.ndarray  # of diff.unchanged, in that order
    full_reason: str | None  # why everything is embedded again (None: incremental)
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)


@dataclass
class BuildReport:
    version: str | None  # None: nothing changed, nothing published
    count: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    index: IndexSpec | None = None
    added: int = 0
    changed: int = 0
    removed: int = 0
    reused: int = 0
    moved: int = 0  # of `reused`: images found under a new key, id and vector kept
    full_reason: str | None = None
    previous_version: str | None = None

    @property
    def images_per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


def read_published(out: Store) -> tuple[str | None, Manifest | None, str | None]:
    """(version, manifest, why it cannot be reused) of what `out` serves now; all None if nothing."""
    try:
        if not out.exists("CURRENT"):
            return None, None, None
        version = read_current(out)
        return version, load_manifest(out, version_folder(version)), None
    except (ArtifactError, StoreError) as exc:
        return None, None, f"the published index cannot be reused ({exc})"


def full_rebuild_reason(previous: Manifest, model: ModelInfo) -> str | None:
    """Why vectors of the published manifest cannot be mixed with this build's; None if they can."""
    if previous.model_fingerprint != model.fingerprint:
        return f"the model changed (fingerprint {previous.model_fingerprint} -> {model.fingerprint})"
    if previous.embedding_dim != model.embedding_dim:
        return f"the embedding dimension changed ({previous.embedding_dim} -> {model.embedding_dim})"
    if previous.preprocessing != model.preprocessing:
        return "the preprocessing changed"
    if previous.precision != model.precision:
        return f"the precision changed ({previous.precision} -> {model.precision})"
    if not stores_exact_vectors(IndexSpec.from_dict(previous.index)):
        return f"the published index ({previous.index.get('factory')}) does not store exact vectors"
    return None


def hash_keys(store: Store, keys: list[str]) -> dict[str, str]:
    """sha256 of each key's bytes (streamed). A file that cannot be read stops the build: taken for
    changed, a read error would drop the image (and retire its id) if the next read failed too."""
    hashes = {}
    for key in keys:
        try:
            hashes[key] = store_sha256(store, key)
        except StoreError as exc:
            raise BuildError(f"{exc} (checking whether it changed); nothing was published") from exc
    return hashes


def plan_build(
    collection: Collection, model: ModelInfo, full: bool = False, retention: RetentionPolicy | None = None
) -> BuildPlan:
    """Diff the collection against the published version and fetch the vectors to reuse."""
    version, previous, unusable = read_published(collection.out)
    reason = unusable
    if previous is not None:
        reason = "--full was given" if full else full_rebuild_reason(previous, model)
    reused = np.zeros((0, model.embedding_dim), dtype=np.float32)
    if previous is None or reason is not None:
        diff = full_diff(collection.entries, previous)
    else:
        hashes = hash_keys(collection.source, keys_to_hash(collection.entries, previous))
        diff = diff_collection(collection.entries, previous, hashes)
        assert version is not None
        try:
            reused = fetch_vectors(collection.out, version, previous, [record.id for record in diff.unchanged])
        except ArtifactError as exc:
            reason = f"the published index cannot be reused ({exc})"
            diff = full_diff(collection.entries, previous)
    return BuildPlan(
        collection=collection,
        model=model,
        diff=diff,
        previous=previous,
        previous_version=version,
        next_id=previous.next_id if previous is not None else 0,
        reused_vectors=reused,
        full_reason=reason,
        retention=retention or RetentionPolicy(),
    )


def fetch_vectors(out: Store, version: str, manifest: Manifest, ids: list[int]) -> np.ndarray:
    """The published vectors of these ids, checked against the manifest on the way (streamed sha256)."""
    if not ids:
        return np.zeros((0, manifest.embedding_dim), dtype=np.float32)
    # A remote index is downloaded into a folder of this build only, deleted once the vectors are copied out.
    with tempfile.TemporaryDirectory(prefix="index-builder-") as cache:
        index = open_index(out, version_folder(version), manifest, Path(cache))
        vectors = reconstruct_vectors(index, np.asarray(ids, dtype=np.int64))
        del index
    return vectors


def finish_build(
    plan: BuildPlan,
    embedded: list[ImageRecord],
    vectors: np.ndarray,
    skipped: list[tuple[str, str]],
    started: float,
) -> BuildReport:
    """Merge reused and new vectors under stable ids, index them and publish (unless nothing changed)."""
    diff, source = plan.diff, plan.collection.source
    records, next_id = assign_ids(diff, embedded, plan.next_id)
    added_keys = set(diff.added)
    changed = sum(1 for record in embedded if record.key not in added_keys)
    counts = {
        "added": len(embedded) - changed,
        "changed": changed,
        # A changed image that no longer decodes leaves the index like a removed one.
        "removed": len(diff.removed) + len(diff.changed) - changed,
        "reused": len(diff.unchanged),
        "moved": diff.moved,
    }
    if not records:
        raise BuildError(f"no image in {source.uri} could be read ({len(skipped)} skipped)")
    previous = plan.previous
    previous_skipped = {entry.get("path", "") for entry in previous.skipped} if previous is not None else set()
    if (
        previous is not None
        and plan.full_reason is None
        and counts["added"] == counts["changed"] == counts["removed"] == 0
        and not diff.rewrites_records  # moved or touched images: new keys or stamps to record
        and {key for key, _ in skipped} == previous_skipped
    ):
        return BuildReport(
            version=None,
            count=len(records),
            skipped=skipped,
            seconds=time.perf_counter() - started,
            index=IndexSpec.from_dict(previous.index),
            reused=counts["reused"],
            previous_version=plan.previous_version,
        )
    all_vectors = merge_vectors(diff, plan.reused_vectors, embedded, vectors, records, plan.model.embedding_dim)
    mtimes = {entry.key: entry.mtime_ns for entry in plan.collection.entries}
    records = [replace(record, mtime_ns=mtimes.get(record.key)) for record in records]
    spec = choose_index_spec(len(records), plan.model.embedding_dim)
    index = build_faiss_index(all_vectors, spec, np.array([record.id for record in records], dtype=np.int64))
    with tempfile.TemporaryDirectory(prefix="index-builder-") as work:
        index_file = Path(work) / "index.faiss"
        write_index_file(index, index_file)
        del index
        check_written(index_file, len(records), plan.model.embedding_dim)
        manifest = Manifest(
            model=plan.model.name,
            model_fingerprint=plan.model.fingerprint,
            embedding_dim=plan.model.embedding_dim,
            preprocessing=plan.model.preprocessing,
            index=spec.to_dict(),
            source=source.uri,
            records=tuple(records),
            index_sha256=file_sha256(index_file),
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            next_id=next_id,
            precision=plan.model.precision,
            skipped=tuple({"path": path, "reason": reason} for path, reason in skipped),
        )
        version = publish(plan.collection.out, index_file, manifest, plan.retention)
    return BuildReport(
        version=version,
        count=len(records),
        skipped=skipped,
        seconds=time.perf_counter() - started,
        index=spec,
        full_reason=plan.full_reason,
        previous_version=plan.previous_version,
        **counts,
    )


def check_written(index_file: Path, count: int, dim: int) -> None:
    """FAISS reports a failed write (a full disk) only on stderr: map the file back before it is published."""
    try:
        written = map_index_file(index_file)
    except RuntimeError as exc:
        raise BuildError(f"the index file written to {index_file} does not read back: {exc}") from exc
    if written.ntotal != count or written.d != dim:
        raise BuildError(
            f"the index file written to {index_file} holds {written.ntotal} x {written.d}, not {count} x {dim}"
        )


def merge_vectors(
    diff: CollectionDiff,
    reused: np.ndarray,
    embedded: list[ImageRecord],
    vectors: np.ndarray,
    records: list[ImageRecord],
    dim: int,
) -> np.ndarray:
    """One (n, dim) matrix in the order of `records` (by key), from the reused and the new vectors."""
    row_of: dict[str, tuple[np.ndarray, int]] = {}
    for row, record in enumerate(diff.unchanged):
        row_of[record.key] = (reused, row)
    for row, record in enumerate(embedded):
        row_of[record.key] = (vectors, row)
    merged = np.empty((len(records), dim), dtype=np.float32)
    for position, record in enumerate(records):
        matrix, row = row_of[record.key]
        merged[position] = matrix[row]
    return merged
