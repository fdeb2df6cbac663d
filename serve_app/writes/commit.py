"""One group commit of writes to the collection and the index, durable before it returns; and recovery.

A commit, under the index's commit lock (image_search/commit_lock.py, the one CLI builders take too):
1. pending intents left by a crash (or a failed commit) are reconciled first (below);
2. the batch is planned against CURRENT (serve_app/writes/plan.py): ids, outcomes, what changes;
3. an intent naming every key the batch touches is written to the index store (`writes/intents/`),
   BEFORE any image byte moves, so a crash anywhere after this point is found again;
4. image bytes are stored in the collection (a folder: temporary file, fsync, rename; S3: one PUT),
   and deleted keys are removed from it;
5. one new segment (the batch's vectors) plus deletions is published as a new version
   (segments.commit_version: version file read back, CURRENT checked to still name the base, CURRENT);
6. the intent is removed. Only then is the batch acknowledged.

Recovery makes the index agree with the store for each key of a pending intent, the store being the
source of truth (as for the builder): bytes present but not indexed (or indexed with other bytes) are
embedded and committed; an indexed key whose file is gone is deleted; a file that does not decode (it
never could have been acknowledged) is removed. So after any crash, bytes stored but never committed
are committed, and none accumulate. Ids come from the version's `next_id`, which only grows.

Errors: a full disk is `StoreFull` (507), any other store failure `WriteFailed` (503, logged), the lock
held by a builder for longer than `lock_wait_s` `WriterBusy` (503, naming the holder). A failed batch
acknowledges nothing; what it already stored is reconciled by the next commit or the next start.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from image_search.artifact import RetentionPolicy, VersionFactsCache, new_version_name, prune
from image_search.commit_lock import Lease, LockBusy, acquire
from image_search.errors import ArtifactError
from image_search.index_planner import DEFAULT_MAX_INDEX_MEMORY
from image_search.index_spec import choose_segment_index_spec
from image_search.manifest import ImageRecord
from image_search.segments import (
    Version,
    build_segment,
    commit_version,
    read_current_version,
    read_pointer,
    read_segment_records,
    with_changes,
)
from image_search.storage import LocalStore, S3Store, Store, StoreError
from serve_app.writes.errors import StoreFull, WriteFailed, WriterBusy
from serve_app.writes.plan import LiveEntry, LiveState, Op, Outcome, Plan, Put, Remove, plan_batch

logger = logging.getLogger("ray.serve")

INTENTS = "writes/intents"
INTENT_FORMAT = 1
COMMIT_ATTEMPTS = 2  # a base that moved (a writer without the lock) is planned on again once

# Embeds image bytes for recovery: one vector per item, None for bytes that do not decode.
EmbedBytes = Callable[[Sequence[bytes]], list[np.ndarray | None]]


@dataclass(frozen=True)
class CommitResult:
    outcomes: list[Outcome]
    version: str  # the version holding the batch (the base when nothing changed)


# --- small store operations the Store protocol lacks -------------------------------------------------


def delete_key(store: Store, key: str) -> None:
    """Remove one object; a key already gone is fine (deletes are replayed by recovery)."""
    if isinstance(store, LocalStore):
        path = store.local_path(key)
        assert path is not None
        try:
            path.unlink(missing_ok=True)
            fsync_folder(path.parent)
        except OSError as exc:
            raise StoreError(f"cannot delete {path}: {exc.strerror or exc}") from exc
    elif isinstance(store, S3Store):
        try:
            store.client.delete_object(Bucket=store.bucket, Key=store._key(key))
        except Exception as exc:
            raise StoreError(f"cannot delete s3://{store.bucket}/{store._key(key)}: {exc}") from exc
    else:
        delete = getattr(store, "delete_key", None)
        if delete is None:
            raise TypeError(f"cannot delete single keys of {type(store).__name__}")
        delete(key)


def fsync_folder(folder: Path) -> None:
    """A rename or unlink is durable once its folder is synced."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def keys_under(store: Store, prefix: str) -> list[str]:
    """Keys directly under `prefix/` (for the intent folder: not a walk of the whole index)."""
    if isinstance(store, LocalStore):
        folder = store.root / prefix
        if not folder.is_dir():
            return []
        return sorted(f"{prefix}/{p.name}" for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if isinstance(store, S3Store):
        base = store._key(prefix) + "/"
        try:
            pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=base)
            found = [item["Key"][len(base) :] for page in pages for item in page.get("Contents", [])]
        except Exception as exc:
            raise StoreError(f"cannot list {store.uri}/{prefix}: {exc}") from exc
        return sorted(f"{prefix}/{name}" for name in found if name and "/" not in name)
    inner = getattr(store, "inner", None)  # a wrapping store (tests inject faults this way)
    if inner is not None:
        return keys_under(inner, prefix)
    raise TypeError(f"cannot list {type(store).__name__}")


def remove_partial_writes(store: Store, keys: set[str]) -> None:
    """A folder write killed midway leaves its temporary file (`.<name>.<random>.tmp`, see LocalStore)."""
    if not isinstance(store, LocalStore):
        return  # an S3 PUT that did not complete leaves nothing
    for key in keys:
        path = store.local_path(key)
        assert path is not None
        for partial in path.parent.glob(f".{path.name}.*.tmp"):
            partial.unlink(missing_ok=True)


def is_disk_full(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def local_mtime_ns(store: Store, key: str) -> int | None:
    path = store.local_path(key)
    try:
        return path.stat().st_mtime_ns if path is not None else None
    except OSError:
        return None


# --- the committer --------------------------------------------------------------------------------------


class Committer:
    """Commits groups of writes to one index root; blocking (the Writer runs it on a thread)."""

    def __init__(
        self,
        index: Store,
        images_for: Callable[[Version], Store],
        embed: EmbedBytes,
        holder: str,
        lock_wait_s: float,
        lock_lease_s: float,
        retention: RetentionPolicy | None = None,
        after_publish: Callable[..., Version | None] | None = None,
        max_index_memory: int = DEFAULT_MAX_INDEX_MEMORY,
    ) -> None:
        self.index = index
        self.images_for = images_for
        self.embed = embed
        self.holder = holder
        self.lock_wait_s = lock_wait_s
        self.lock_lease_s = lock_lease_s
        self.retention = retention or RetentionPolicy()
        self.version_facts = VersionFactsCache()  # maintain() prunes every few seconds: read each version once
        # Compaction when the merge policy calls for it: (index, version, before_commit=lease check).
        self.after_publish = after_publish
        self.max_index_memory = max_index_memory  # the planner's budget for each commit's segment
        self.state: LiveState | None = None  # the live state of `self.state.version`, kept across batches
        self.records: dict[str, tuple[ImageRecord, ...]] = {}  # per segment (segments never change)
        self.lease: Lease | None = None  # held during a commit, recovery or maintenance

    # --- entry points -----------------------------------------------------------------------------

    def commit(self, ops: Sequence[Op]) -> CommitResult:
        with self._errors_mapped(), self._locked():
            self._recover_locked()
            for attempt in range(COMMIT_ATTEMPTS):
                base = self._base()
                plan = plan_batch(self._state(base), ops)
                if not plan.changes_anything:
                    return CommitResult(plan.outcomes, base.name)
                try:
                    version = self._apply(base, plan)
                except ArtifactError:
                    if attempt + 1 < COMMIT_ATTEMPTS and read_pointer(self.index) != base.name:
                        logger.warning("CURRENT moved during a write commit; planning it again on the new base")
                        self.state = None
                        continue
                    raise
                return CommitResult(plan.outcomes, version.name)
        raise AssertionError("unreachable")

    def recover(self) -> int:
        """Reconcile every pending intent (at the Writer's start); the number of intents handled."""
        with self._errors_mapped(), self._locked():
            return self._recover_locked()

    def maintain(self) -> None:
        """Prune old versions and compact when the merge policy says so (between batches, under the lock)."""
        with self._errors_mapped(), self._locked():
            base = self._base()
            compact = self.after_publish
            if compact is not None and compact(self.index, base, before_commit=self._check_lease) is not None:
                self.state = None  # segments merged: the per-key segment names changed
            prune(self.index, read_pointer(self.index) or base.name, self.retention, time.time(), self.version_facts)

    # --- the steps --------------------------------------------------------------------------------

    def _check_lease(self) -> None:
        """An S3 lease lost to another writer (its refreshes failed): LockBusy, never write CURRENT."""
        if self.lease is not None:
            self.lease.check()

    @contextmanager
    def _errors_mapped(self) -> Iterator[None]:
        try:
            yield
        except LockBusy as exc:
            raise WriterBusy(f"The index is being written by another process: {exc}") from None
        except StoreError as exc:
            if is_disk_full(exc):
                logger.error("write commit failed, the store is full: %s", exc)
                raise StoreFull("The image store has no space left; nothing of this request was stored.") from None
            logger.error("write commit failed, a store cannot be written: %s", exc)
            raise WriteFailed("The image store cannot be written right now; nothing was stored.") from None
        except ArtifactError as exc:
            logger.error("write commit failed: %s", exc)
            raise WriteFailed("The index cannot be written right now; nothing was stored.") from None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.lease = acquire(self.index, self.holder, self.lock_wait_s, self.lock_lease_s)
        try:
            yield
        finally:
            self.lease.release()
            self.lease = None

    def _base(self) -> Version:
        base = read_current_version(self.index)
        if base is None:
            raise ArtifactError(f"no index is published at {self.index.uri}: build one with index_builder first")
        return base

    def _state(self, base: Version) -> LiveState:
        if self.state is not None and self.state.version == base.name:
            return self.state
        names = set(base.segment_names)
        self.records = {name: records for name, records in self.records.items() if name in names}
        overrides = {record.id: record for record in base.overrides}
        live: list[tuple[str, ImageRecord]] = []
        for segment in base.segments:
            if segment.name not in self.records:
                self.records[segment.name] = read_segment_records(self.index, segment)
            dead = set(base.deleted_ids(segment.name))
            live.extend((segment.name, overrides.get(r.id, r)) for r in self.records[segment.name] if r.id not in dead)
        self.state = LiveState.from_segments(base.name, base.next_id, live)
        return self.state

    def _apply(self, base: Version, plan: Plan) -> Version:
        """Steps 3-6 of a commit (see the module docstring)."""
        intent = self._write_intent(set(plan.puts) | plan.removed_keys)
        images = self.images_for(base)
        for key, (_, put) in sorted(plan.puts.items()):
            images.write_bytes(key, put.data)
        for key in sorted(plan.removed_keys):
            delete_key(images, key)
        version = self._publish(base, plan, images)
        delete_key(self.index, intent)  # a crash before this only makes recovery find nothing to do
        return version

    def _publish(self, base: Version, plan: Plan, images: Store) -> Version:
        written = sorted(plan.puts.items(), key=lambda item: item[1][0])
        vectors = [put.vector for _, (_, put) in written]
        missing = [i for i, vector in enumerate(vectors) if vector is None]
        if missing:
            embedded = self.embed([written[i][1][1].data for i in missing])
            for i, vector in zip(missing, embedded, strict=True):
                vectors[i] = vector
        keep = [i for i, vector in enumerate(vectors) if vector is not None]
        segment_names: dict[str, str] = {}
        added = []
        if keep:
            ids = np.asarray([written[i][1][0] for i in keep], dtype=np.int64)
            records = [
                ImageRecord(
                    id=written[i][1][0],
                    key=written[i][0],
                    size=len(written[i][1][1].data),
                    sha256=written[i][1][1].sha256,
                    mtime_ns=local_mtime_ns(images, written[i][0]),
                )
                for i in keep
            ]
            matrix = np.stack([np.asarray(vectors[i], dtype=np.float32) for i in keep])
            # The index a segment of this size calls for within the configured budget (as the builder's).
            spec = choose_segment_index_spec(
                len(ids), base.live_count + len(ids), base.embedding_dim, max_memory_bytes=self.max_index_memory
            )
            segment = build_segment(self.index, ids, matrix, records, base.embedding_dim, spec)
            added.append(segment)
            segment_names = {record.key: segment.name for record in records}
        rewritten = {image_id for image_id, _ in plan.puts.values()} | {i for ids in plan.dead.values() for i in ids}
        version = with_changes(
            base,
            name=new_version_name(),
            add=added,
            delete={segment: sorted(ids) for segment, ids in plan.dead.items()},
            overrides=[record for record in base.overrides if record.id not in rewritten],
            next_id=plan.state.next_id,
        )
        self._check_lease()
        commit_version(self.index, version)
        state = plan.state
        for key, segment_name in segment_names.items():
            entry = state.by_key[key]
            state.by_key[key] = LiveEntry(entry.id, entry.sha256, segment_name)
        for i in (i for i in range(len(written)) if i not in keep):  # undecodable (recovery only): gone
            key, (image_id, _) = written[i]
            state.by_key.pop(key, None)
            state.key_of.pop(image_id, None)
        state.version = version.name
        self.state = state
        return version

    def _write_intent(self, keys: set[str]) -> str:
        name = f"{INTENTS}/{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}.json"
        body = {"format_version": INTENT_FORMAT, "holder": self.holder, "keys": sorted(keys)}
        self.index.write_bytes(name, json.dumps(body).encode())
        return name

    def _recover_locked(self) -> int:
        if isinstance(self.index, LocalStore) and (self.index.root / INTENTS).is_dir():
            # An intent whose own write was cut short: nothing was moved after it, so nothing to redo.
            for partial in (self.index.root / INTENTS).glob(".*.tmp"):
                partial.unlink(missing_ok=True)
        intents = keys_under(self.index, INTENTS)
        if not intents:
            return 0
        keys: set[str] = set()
        for intent in intents:
            keys.update(json.loads(self.index.read_bytes(intent))["keys"])
        if keys:
            self._reconcile(sorted(keys))
            remove_partial_writes(self.images_for(self._base()), keys)
        for intent in intents:
            delete_key(self.index, intent)
        logger.warning("recovered %d pending write intent(s) covering %d key(s)", len(intents), len(keys))
        return len(intents)

    def _reconcile(self, keys: Sequence[str]) -> None:
        """Make the index agree with the collection store for `keys`, then publish that (if anything changed)."""
        import hashlib

        base = self._base()
        state = self._state(base)
        images = self.images_for(base)
        ops: list[Op] = []
        for key in keys:
            entry = state.by_key.get(key)
            if images.exists(key):
                data = images.read_bytes(key)
                sha = hashlib.sha256(data).hexdigest()
                if entry is None or entry.sha256 != sha:
                    ops.append(Put(key, data, sha))
            elif entry is not None:
                ops.append(Remove(entry.id))
        plan = plan_batch(state, ops)
        if not plan.changes_anything:
            return
        # The bytes are in place already: only the index follows (no intent needed: a crash here
        # leaves the intents being reconciled in place).
        version = self._publish(base, plan, images)
        gone = [key for key, (image_id, _) in plan.puts.items() if key not in self.state.by_key] if self.state else []
        for key in gone:
            logger.error("recovery removed %s from the collection: its bytes do not decode", key)
            delete_key(images, key)
        logger.warning("recovery committed %d key(s) as version %s", len(ops), version.name)
