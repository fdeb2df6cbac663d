"""Pruning a node's cache of S3 segments: drop the segments no retained version names.

Segments of a remote index are downloaded once per node into
`cache_dir/<hash of the store uri>/segments/<segment>/` (image_search/segments.py) and shared by
every replica on the node. Without pruning every segment ever served stays there (at 2 GB a
version and hourly builds a 100 GB disk fills in two days). After a replica loads a new version it
prunes: a cached segment folder is deleted when
- no version still listed in the store names it (the store's retention decides what is retained;
  a version file is immutable, so each is read once and remembered), and
- this replica does not hold it (`keep`), and
- it was not written in the last `grace_s` (another replica on the node may have just downloaded
  it for a version published after our listing), and
- no other process is downloading it (its `.lock` is taken first, as the downloader does).
A replica on the node still serving a segment deleted here keeps its mapping (the file stays until
unmapped); if it needs the segment again it downloads it again. If the store cannot be listed, or a
listed version file cannot be read just now, nothing is deleted this time.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import time
from pathlib import Path

from image_search.artifact import list_versions
from image_search.errors import ArtifactError
from image_search.segments import cache_path, read_version
from image_search.storage import Store

logger = logging.getLogger("ray.serve")

# A cached segment younger than this is never pruned (see the module docstring).
DEFAULT_CACHE_GRACE_S = 600.0


def segment_cache_root(cache_dir: Path, store: Store) -> Path:
    """The folder holding this store's cached segments, one sub-folder per segment."""
    return cache_path(cache_dir, store, "_", "_").parent.parent


class SegmentCache:
    """One node's cache of one store's segments, as a replica sees it."""

    def __init__(self, store: Store, cache_dir: Path, grace_s: float = DEFAULT_CACHE_GRACE_S) -> None:
        if grace_s < 0:
            raise ValueError("grace_s must be >= 0")
        self.store = store
        self.root = segment_cache_root(cache_dir, store)
        self.grace_s = grace_s
        self.named_by: dict[str, frozenset[str]] = {}  # version -> its segments (version files never change)

    def cached(self) -> list[str]:
        return sorted(path.name for path in self.root.iterdir() if path.is_dir()) if self.root.is_dir() else []

    def retained_segments(self) -> set[str]:
        """Segments named by a version the store still lists (StoreError if that cannot be told now)."""
        listed = [info.name for info in list_versions(self.store)]
        for name in listed:
            if name not in self.named_by:
                try:
                    self.named_by[name] = frozenset(read_version(self.store, name).segment_names)
                except ArtifactError:
                    # A broken (or format-2) version names nothing this code can serve.
                    self.named_by[name] = frozenset()
        self.named_by = {name: self.named_by[name] for name in listed}
        return set().union(*self.named_by.values())

    def prune(self, keep: set[str], now: float | None = None) -> list[str]:
        """Delete the cached segments the module docstring allows; the names deleted."""
        if not self.root.is_dir():
            return []
        wanted = self.retained_segments() | keep
        now = time.time() if now is None else now
        deleted = []
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir() or folder.name in wanted:
                continue
            if now - _newest_mtime(folder) < self.grace_s:
                continue
            if _delete_unless_busy(folder):
                deleted.append(folder.name)
        if deleted:
            logger.info("segment cache %s: dropped %d segments no retained version uses", self.root, len(deleted))
        return deleted


def _newest_mtime(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    for path in folder.iterdir():
        with contextlib.suppress(OSError):
            times.append(path.stat().st_mtime)
    return max(times)


def _delete_unless_busy(folder: Path) -> bool:
    """Delete `folder` holding its download lock; False when a download holds it now."""
    try:
        with (folder / ".lock").open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            shutil.rmtree(folder)
            return True
    except OSError as exc:
        logger.warning("could not drop cached segment %s: %s", folder, exc)
        return False
