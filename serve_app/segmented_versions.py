"""Versions held as the immutable segments they are made of: a new version loads only its new segments.

A version (format 3, image_search/segments.py) is a small version file naming segments, plus the
ids dead in each. Segments never change once written, so a replica keeps what it loaded of a
segment (a Searcher: the mapped FAISS index; the Ingress: the id -> record lookup) under the
segment's name, and a version that adds one small segment costs reading the version file and
loading that segment, nothing else. A held version is its segments plus what is particular to it
(its deletions and record overrides), assembled by a callable.

`max_versions` (the capacity) still counts versions: how many versions' segment sets are held at
once. When a version is dropped, the segments no held (or loading) version names are dropped with
it; a caller that still uses a dropped version (a request in flight) keeps its objects alive
until it returns.

Loads are shared and outlive their callers (see LoadedVersions): a version's segments load as
tasks of their own, shared between versions loading at the same time, so two versions naming
one new segment load it once. No Ray, no FAISS and no storage: the I/O arrives as callables.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from image_search.segments import SegmentInfo, Version
from serve_app.loaded_versions import LoadedVersions

S = TypeVar("S")  # what a replica keeps of one segment
T = TypeVar("T")  # what a replica keeps of one version (built from its segments)


class SegmentPool(Generic[S]):
    """Loaded segments by name; each loaded once however many versions ask for it at the same time."""

    def __init__(self, load: Callable[[SegmentInfo], S]) -> None:
        self.load = load
        self.items: dict[str, S] = {}
        self.loading: dict[str, asyncio.Task[S]] = {}

    async def get(self, info: SegmentInfo) -> S:
        item = self.items.get(info.name)
        if item is not None:
            return item
        task = self.loading.get(info.name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(info), name=f"load segment {info.name}")
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
            self.loading[info.name] = task
        return await asyncio.shield(task)

    async def _load(self, info: SegmentInfo) -> S:
        try:
            item = await asyncio.to_thread(self.load, info)
        finally:
            del self.loading[info.name]
        self.items[info.name] = item
        return item

    def keep_only(self, names: set[str]) -> list[str]:
        """Drop every loaded segment not in `names`; the names dropped."""
        dropped = [name for name in self.items if name not in names]
        for name in dropped:
            del self.items[name]
        return dropped


class SegmentedVersions(Generic[S, T]):
    """A replica's versions, each assembled from shared segments (see the module docstring).

    `read_version(name)` reads a version file (blocking; run off the loop), `check(version)` may
    refuse it before any segment loads (another model), `load_segment(info)` loads one segment
    (blocking), `assemble(version, segments)` builds what the replica keeps of the version from its
    segments in the version's order (blocking: it may build per-version filters).
    """

    def __init__(
        self,
        capacity: int,
        read_version: Callable[[str], Version],
        load_segment: Callable[[SegmentInfo], S],
        assemble: Callable[[Version, Sequence[S]], T],
        check: Callable[[Version], None] | None = None,
    ) -> None:
        self.read_version = read_version
        self.check = check
        self.assemble = assemble
        self.segments: SegmentPool[S] = SegmentPool(load_segment)
        self.versions: LoadedVersions[T] = LoadedVersions(capacity, self._load, on_drop=self._dropped)
        # The segments each held or loading version names: what must stay loaded.
        self.uses: dict[str, tuple[str, ...]] = {}

    async def get(self, name: str) -> T:
        return await self.versions.get(name)

    def names(self) -> list[str]:
        """Held versions, most recently used last."""
        return self.versions.names()

    def newest(self) -> T | None:
        return self.versions.newest()

    def segment_names(self) -> list[str]:
        return sorted(self.segments.items)

    def __contains__(self, name: str) -> bool:
        return name in self.versions.items

    async def _load(self, name: str) -> T:
        version = await asyncio.to_thread(self.read_version, name)
        if self.check is not None:
            self.check(version)
        self.uses[name] = version.segment_names
        try:
            segments = await asyncio.gather(*(self.segments.get(info) for info in version.segments))
            return await asyncio.to_thread(self.assemble, version, segments)
        except BaseException:
            self._dropped(name)  # what only this version needed goes (the next request tries again)
            raise

    def _dropped(self, name: str) -> None:
        self.uses.pop(name, None)
        wanted = {segment for segments in self.uses.values() for segment in segments}
        self.segments.keep_only(wanted)
