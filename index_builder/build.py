"""Build an index from a collection of images: list, diff, embed what changed, publish one segment, compact.

Shared by both engines; an engine only turns keys into (records, vectors, skipped):

    collection = open_collection(images, out)           list the images (key, size, mtime)
    plan = plan_build(collection, model, full=...)      diff against the published version's records
    records, vectors, skipped = <engine>(plan.diff.to_embed)
    report = finish_build(plan, records, vectors, skipped, started)

The index is stored as segments (image_search/segments.py). An incremental build reads the published
version file and its segments' records.json (no vectors, no index), embeds what is new or edited, and
publishes ONE new segment with those vectors plus deletions ("id X of segment S is dead": removed
images, and the old copies of edited ones) and record overrides (moved or re-stat'ed images whose
vector did not change). Its cost follows the change, not the collection. Ids are stable: an edited
image keeps its id, a new one gets `next_id`.

`--full` (or another model fingerprint, embedding dim, preprocessing or precision: said in
`BuildPlan.full_reason`) embeds everything again and publishes one fresh segment, still keeping the
published ids (a format-2 index is read for its ids only then; without --full it is refused).

If CURRENT exists but its version cannot be read (an I/O error, an S3 503, a newer format), the build
fails with the reason: ids restart at 0 only when nothing was ever published.

When nothing changed (no image added, changed, removed, moved or re-stat'ed, the same skipped files
and the same collection root) no version is published. An empty collection with a published version
publishes an empty version (everything removed).

After publishing, the merge policy (image_search/merge_policy.py) may call for a compaction: the
chosen segments' live vectors are read (downloaded on S3), merged into one segment with the index its
size calls for, and published as a new version with the same ids. `--compact` merges everything.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from image_search.artifact import (
    RetentionPolicy,
    load_manifest,
    new_version_name,
    publish,
    version_folder,
    version_manifest,
)
from image_search.decoding import IMAGE_EXTENSIONS
from image_search.errors import ArtifactError
from image_search.faiss_index import ivf_centroids
from image_search.index_spec import (
    DEFAULT_MAX_INDEX_MEMORY,
    IndexSpec,
    choose_segment_index_spec,
    merged_segment_spec,
)
from image_search.manifest import ImageRecord, Manifest
from image_search.merge_policy import MergePolicy, SegmentStats, full_merge, plan_merges
from image_search.segments import (
    LegacyFormatError,
    SegmentInfo,
    Version,
    VersionContents,
    build_segment,
    open_segment_index,
    open_segment_vectors,
    read_contents,
    read_pointer,
    read_version,
    store_sha256,
    with_changes,
)
from image_search.storage import Entry, Store, StoreError, open_store
from index_builder.diff import CollectionDiff, assign_ids, diff_collection, full_diff, keys_to_hash
from index_builder.listing import list_images

# Test hook: the builder stops itself (SIGSTOP) at the named point so a test can SIGKILL it exactly there.
STOP_AT_ENV = "INDEX_BUILDER_STOP_AT"


def checkpoint(point: str) -> None:
    """A named point of a publish; see STOP_AT_ENV."""
    if os.environ.get(STOP_AT_ENV) == point:
        print(f"index_builder: stopped at {point}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)


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
    """Both locations of a build (folders or s3:// prefixes) and the images found (maybe none: plan_build
    refuses an empty collection only when nothing was published; otherwise it is a removal of everything)."""
    source = open_store(images)
    listing = list_images(source)  # a folder or prefix that cannot be listed raises StoreError: no guessing
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
class Published:
    """What `out` serves now, as the diff needs it: the version and its segments' records (no vectors)."""

    pointer: str  # the version CURRENT named
    version: Version | None  # None: a format-2 index (only --full reads it, for its ids)
    manifest: Manifest  # the live records (overrides applied) and the model fields, manifest-shaped
    contents: VersionContents | None = None


@dataclass(frozen=True)
class BuildPlan:
    collection: Collection
    model: ModelInfo
    diff: CollectionDiff
    previous: Manifest | None
    previous_version: str | None
    next_id: int
    full_reason: str | None  # why everything is embedded again (None: incremental)
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    published: Published | None = None
    compact: bool = False  # --compact: merge every segment into one after publishing
    merge_policy: MergePolicy = field(default_factory=MergePolicy)
    # --max-index-memory: the planner's budget for each segment's index (image_search/index_planner.py).
    max_index_memory: int = DEFAULT_MAX_INDEX_MEMORY
    # Called right before each CURRENT write (the publish and a compaction): the commit lock's
    # `check`, so a builder whose S3 lease was taken over (its refreshes failed) never publishes.
    before_commit: Callable[[], None] | None = None


@dataclass
class BuildReport:
    version: str | None  # what CURRENT names after the build; None: nothing changed, nothing published
    count: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    index: IndexSpec | None = None  # of the new segment (or of the largest one)
    added: int = 0
    changed: int = 0
    removed: int = 0
    reused: int = 0
    moved: int = 0  # of `reused`: images found under a new key, id and vector kept
    full_reason: str | None = None
    previous_version: str | None = None
    compacted: str | None = None  # the version a compaction published (then also `version`)
    segments: int = 0  # segments of the final version

    @property
    def images_per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


def read_published(out: Store, full: bool = False) -> Published | None:
    """What `out` serves now; None only when nothing was ever published (no CURRENT).

    Any error reading what CURRENT names fails the build: starting over would give ids from 0 again
    and `/images/0` would show another picture.
    """
    try:
        name = read_pointer(out)
        if name is None:
            return None
        try:
            version = read_version(out, name)
        except LegacyFormatError:
            if not full:
                raise
            # --full on a format-2 index: its records keep their ids in the new format.
            return Published(name, None, load_manifest(out, version_folder(name)))
        contents = read_contents(out, version)
        return Published(name, version, version_manifest(version, contents.live()), contents)
    except LegacyFormatError as exc:
        raise BuildError(str(exc)) from exc
    except (ArtifactError, StoreError) as exc:
        raise BuildError(
            f"the published index at {out.uri} cannot be read ({exc}); nothing was built, so that ids keep "
            "their meaning: fix the store or its access and run again"
        ) from exc


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
    collection: Collection,
    model: ModelInfo,
    full: bool = False,
    retention: RetentionPolicy | None = None,
    compact: bool = False,
    merge_policy: MergePolicy | None = None,
    max_index_memory: int = DEFAULT_MAX_INDEX_MEMORY,
) -> BuildPlan:
    """Diff the collection against the published version's records (reading no vectors)."""
    published = read_published(collection.out, full)
    previous = published.manifest if published is not None else None
    if previous is None and not collection.entries:
        raise BuildError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {collection.source.uri}")
    reason = None
    if published is not None:
        if full:
            reason = "--full was given"
        elif published.version is None:
            reason = "the published index is format 2"
        else:
            reason = full_rebuild_reason(published.manifest, model)
    if previous is None or reason is not None:
        diff = full_diff(collection.entries, previous)
    else:
        hashes = hash_keys(collection.source, keys_to_hash(collection.entries, previous))
        diff = diff_collection(collection.entries, previous, hashes)
    return BuildPlan(
        collection=collection,
        model=model,
        diff=diff,
        previous=previous,
        previous_version=published.pointer if published is not None else None,
        next_id=previous.next_id if previous is not None else 0,
        full_reason=reason,
        retention=retention or RetentionPolicy(),
        published=published,
        compact=compact,
        merge_policy=merge_policy or MergePolicy(),
        max_index_memory=max_index_memory,
    )


def finish_build(
    plan: BuildPlan,
    embedded: list[ImageRecord],
    vectors: np.ndarray,
    skipped: list[tuple[str, str]],
    started: float,
) -> BuildReport:
    """Publish the change as one new segment plus deletions (unless nothing changed), then compact if due."""
    diff, source, out = plan.diff, plan.collection.source, plan.collection.out
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
    if not records and plan.collection.entries:
        raise BuildError(f"no image in {source.uri} could be read ({len(skipped)} skipped)")
    mtimes = {entry.key: entry.mtime_ns for entry in plan.collection.entries}
    records = [replace(record, mtime_ns=mtimes.get(record.key, record.mtime_ns)) for record in records]
    published = plan.published
    skipped_entries = tuple({"path": path, "reason": reason} for path, reason in sorted(skipped))
    row_of = {record.key: row for row, record in enumerate(embedded)}
    new_ids = {record.id for record in records if record.key in row_of}
    new_records = sorted((r for r in records if r.key in row_of), key=lambda r: r.id)
    new_vectors = np.asarray(vectors, dtype=np.float32)
    if new_records:
        new_vectors = new_vectors[[row_of[r.key] for r in new_records]]

    if published is None or published.version is None or plan.full_reason is not None:
        version = fresh_version(plan, next_id, source.uri, skipped_entries)
        overrides: list[ImageRecord] = []
        deletions: dict[str, list[int]] = {}
        drop = list(version.segment_names)
    else:
        assert published.contents is not None
        version = published.version
        segment_of = published.contents.segment_of()
        final_ids = {record.id for record in records}
        deletions = {}
        for image_id, segment in segment_of.items():
            if image_id not in final_ids or image_id in new_ids:
                deletions.setdefault(segment, []).append(image_id)
        stored = {r.id: r for seg, rs in published.contents.records.items() for r in rs if segment_of.get(r.id) == seg}
        overrides = [r for r in records if r.id not in new_ids and stored.get(r.id) != r]
        dead = {seg: set(version.deleted_ids(seg)) | set(deletions.get(seg, ())) for seg in version.segment_names}
        # A segment with nothing live left is dropped from the version (retention deletes its files).
        drop = [s.name for s in version.segments if len(dead[s.name]) >= s.count]
    added: list[SegmentInfo] = []
    spec = None
    if new_records:
        spec = choose_segment_index_spec(
            len(new_records), len(records), plan.model.embedding_dim, max_memory_bytes=plan.max_index_memory
        )
        added.append(
            build_segment(
                out,
                np.array([r.id for r in new_records], dtype=np.int64),
                new_vectors,
                new_records,
                plan.model.embedding_dim,
                spec,
            )
        )
    checkpoint("segment-written")
    changed_version = with_changes(
        version,
        name=new_version_name(),
        add=added,
        drop=drop,
        delete=deletions,
        overrides=overrides,
        next_id=next_id,
        source=source.uri,
        skipped=skipped_entries,
        model=plan.model.name,
    )
    changed_version = replace(changed_version, parent=plan.previous_version)
    previous = published.version if published is not None else None
    if previous is not None and plan.full_reason is None and same_content(changed_version, previous):
        if not plan.compact:
            return BuildReport(
                version=None,
                count=len(records),
                skipped=skipped,
                seconds=time.perf_counter() - started,
                index=largest_spec(previous),
                reused=counts["reused"],
                previous_version=plan.previous_version,
                segments=len(previous.segments),
            )
        final = previous  # --compact with nothing changed: only the compaction is published
    else:
        publish(out, changed_version, plan.retention, before_pointer=guarded("version-written", plan.before_commit))
        checkpoint("published")
        final = changed_version
    compacted = compact(
        out, final, plan.retention, plan.merge_policy, plan.compact, plan.max_index_memory, plan.before_commit
    )
    if compacted is not None:
        final = compacted
    return BuildReport(
        version=final.name,
        count=len(records),
        skipped=skipped,
        seconds=time.perf_counter() - started,
        index=spec or largest_spec(final),
        full_reason=plan.full_reason,
        previous_version=plan.previous_version,
        compacted=compacted.name if compacted is not None else None,
        segments=len(final.segments),
        **counts,
    )


def same_content(new: Version, old: Version) -> bool:
    """Whether a planned version would serve exactly what `old` serves (then nothing is published)."""
    return (
        new.segments == old.segments
        and new.deleted == old.deleted
        and new.overrides == old.overrides
        and new.source == old.source
        and tuple(new.skipped) == tuple(old.skipped)
    )


def fresh_version(plan: BuildPlan, next_id: int, source: str, skipped: tuple[dict[str, str], ...]) -> Version:
    """The base of a full rebuild: the previous version's segments (all dropped by the caller) or none."""
    model = plan.model
    previous = plan.published.version if plan.published is not None else None
    return Version(
        name=plan.previous_version or "",
        model=model.name,
        model_fingerprint=model.fingerprint,
        embedding_dim=model.embedding_dim,
        preprocessing=model.preprocessing,
        precision=model.precision,
        source=source,
        segments=previous.segments if previous is not None else (),
        deleted=dict(previous.deleted) if previous is not None else {},
        next_id=next_id,
        skipped=skipped,
        parent=plan.previous_version,
    )


def largest_spec(version: Version) -> IndexSpec | None:
    largest = max(version.segments, key=lambda s: s.count, default=None)
    return largest.spec if largest is not None else None


def segment_stats(version: Version) -> list[SegmentStats]:
    return [SegmentStats(s.name, s.count, len(version.deleted_ids(s.name))) for s in version.segments]


def reusable_centroids(
    out: Store, segments: list[SegmentInfo], version: Version, spec: IndexSpec, merged_count: int, cache: Path
) -> np.ndarray | None:
    """The IVF centroids of the largest merged segment, when it has the merged spec and half the vectors.

    Training k-means is most of an IVF build's time; centroids trained on most of the same vectors
    serve the merged segment as well, so a compaction into a big segment only assigns and adds.
    """
    largest = max(segments, key=lambda s: s.count - len(version.deleted_ids(s.name)))
    live = largest.count - len(version.deleted_ids(largest.name))
    if largest.spec.factory != spec.factory or not spec.factory.startswith("IVF") or 2 * live < merged_count:
        return None
    return ivf_centroids(open_segment_index(out, largest, cache))


def guarded(point: str, before_commit: Callable[[], None] | None) -> Callable[[], None]:
    """What runs between a version file's write and CURRENT's: the kill tests' checkpoint, then the
    lease check (LockBusy: the version file stays unreferenced, CURRENT unchanged)."""

    def before_pointer() -> None:
        checkpoint(point)
        if before_commit is not None:
            before_commit()

    return before_pointer


def compact(
    out: Store,
    version: Version,
    retention: RetentionPolicy,
    policy: MergePolicy,
    force: bool = False,
    max_index_memory: int = DEFAULT_MAX_INDEX_MEMORY,
    before_commit: Callable[[], None] | None = None,
) -> Version | None:
    """Merge what the policy (or `force`: everything) calls for and publish it; the new version, or None.
    `before_commit` runs right before CURRENT is written (the holder's lease check).

    Ids, records and live vectors are unchanged; dead vectors are dropped; overrides are folded into the
    merged segment's records. Reads the chosen segments' raw vectors (an S3 store: downloaded into a
    folder of this build only).
    """
    stats = segment_stats(version)
    groups = plan_merges(stats, policy)
    if force:
        # One segment already, but with record overrides: rewritten too, so they are folded in.
        groups = full_merge(stats) or ([version.segment_names] if version.overrides and version.segments else [])
    if not groups:
        return None
    contents = read_contents(out, version)
    overrides = {record.id: record for record in version.overrides}
    folded: set[int] = set()
    merged: list[SegmentInfo] = []
    by_name = {s.name: s for s in version.segments}
    with tempfile.TemporaryDirectory(prefix="index-builder-compact-") as cache:
        for group in groups:
            ids: list[int] = []
            records: list[ImageRecord] = []
            parts: list[np.ndarray] = []
            for name in group:
                segment = by_name[name]
                stored = contents.records[name]
                # Vectorised: at 1M records a Python loop over rows is tens of seconds of a compaction.
                row_ids = np.fromiter((r.id for r in stored), dtype=np.int64, count=len(stored))
                rows = np.flatnonzero(~np.isin(row_ids, np.asarray(version.deleted_ids(name), dtype=np.int64)))
                if not len(rows):
                    continue
                parts.append(np.asarray(open_segment_vectors(out, segment, Path(cache))[rows]))
                ids.extend(row_ids[rows].tolist())
                if overrides:
                    records.extend(overrides.get(stored[row].id, stored[row]) for row in rows.tolist())
                else:
                    records.extend(stored[row] for row in rows.tolist())
            if not ids:
                continue
            order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
            matrix = np.concatenate(parts)[order]
            ordered = [records[i] for i in order]
            folded.update(ids)
            checkpoint("compaction-started")
            spec = choose_segment_index_spec(
                len(ids), version.live_count, version.embedding_dim, max_memory_bytes=max_index_memory
            )
            largest = max((by_name[name] for name in group), key=lambda s: s.count - len(version.deleted_ids(s.name)))
            largest_live = largest.count - len(version.deleted_ids(largest.name))
            spec = merged_segment_spec(
                spec, largest.spec, largest_live, len(ids), version.embedding_dim, max_index_memory
            )
            centroids = reusable_centroids(out, [by_name[name] for name in group], version, spec, len(ids), Path(cache))
            merged.append(
                build_segment(
                    out,
                    np.asarray(ids, dtype=np.int64)[order],
                    matrix,
                    ordered,
                    version.embedding_dim,
                    spec,
                    centroids=centroids,
                )
            )
    checkpoint("compaction-segment-written")
    compacted = with_changes(
        version,
        name=new_version_name(),
        add=merged,
        drop=[name for group in groups for name in group],
        overrides=[r for r in version.overrides if r.id not in folded],
    )
    publish(out, compacted, retention, before_pointer=guarded("compaction-version-written", before_commit))
    return compacted
