"""The index versions one replica holds: a few, loaded on demand, the least recently used dropped.

Each search names its version. During a handover the Ingress still sends the old version for the
requests that started before it, and the new one for the rest, so a replica holds both for a
while. Another Ingress replica (or one that just restarted) may name a version this replica has
not seen: it is loaded then, once, however many requests ask for it at the same moment. What a
version costs to hold is up to the loader: with segments (serve_app/segmented_versions.py) a
version shares the segments it has in common with the others, and only new ones are loaded.

No Ray and no FAISS here: the loader is a callable, so this is unit-tested directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, ParamSpec, Protocol, TypeVar

from image_search.errors import ArtifactError

logger = logging.getLogger("ray.serve")

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
P = ParamSpec("P")
R = TypeVar("R")


def in_thread(function: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """`function` run off the event loop (blocking loads: reading files, hashing, mapping)."""

    async def threaded(*args: P.args, **kwargs: P.kwargs) -> R:
        return await asyncio.to_thread(function, *args, **kwargs)

    return threaded


def first_line(exc: BaseException) -> str:
    """Ray's wrapped errors carry the remote traceback after the first line: keep the first only."""
    return (str(exc).splitlines() or [type(exc).__name__])[0][:500]


class LoadedVersions(Generic[T]):
    """`load(name)` is awaited for a version not held (wrap a blocking loader with `in_thread`);
    `on_drop(name)` is called for each version dropped to stay within `capacity`."""

    def __init__(
        self,
        capacity: int,
        load: Callable[[str], Awaitable[T]],
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.load = load
        self.on_drop = on_drop
        self.items: OrderedDict[str, T] = OrderedDict()
        self.loading: dict[str, asyncio.Task[T]] = {}

    def names(self) -> list[str]:
        """Held versions, most recently used last."""
        return list(self.items)

    def __contains__(self, name: str) -> bool:
        return name in self.items

    def newest(self) -> T | None:
        return next(reversed(self.items.values()), None)

    async def get(self, name: str) -> T:
        """The loaded version `name`, loading it (off the event loop) if this replica lacks it.

        The load runs as its own task, shared by everyone asking meanwhile; each caller waits on it
        through `asyncio.shield`, so a caller that is cancelled (client gone, deadline) stops waiting
        without cancelling the load the others (and the Preloader) are waiting on.
        """
        item = self.items.get(name)
        if item is not None:
            self.items.move_to_end(name)
            return item
        task = self.loading.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(name), name=f"load {name}")
            # Retrieved even when every caller was cancelled: no "exception was never retrieved" warning.
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
            self.loading[name] = task
        return await asyncio.shield(task)

    async def _load(self, name: str) -> T:
        try:
            loaded = await self.load(name)
        finally:
            # Failed or not, the next request after this one tries again.
            del self.loading[name]
        self.put(name, loaded)
        return loaded

    def put(self, name: str, item: T) -> None:
        self.items[name] = item
        self.items.move_to_end(name)
        while len(self.items) > self.capacity:
            dropped, _ = self.items.popitem(last=False)
            if self.on_drop is not None:
                self.on_drop(dropped)


class Holder(Protocol[T_co]):
    """What the Preloader loads into: LoadedVersions, or a Searcher's segment holdings."""

    def __contains__(self, name: str) -> bool: ...

    async def get(self, name: str) -> T_co: ...


class Preloader(Generic[T]):
    """Loads each newly published version into a Searcher ahead of the Ingress's switch.

    The Ingress's `prepare` reaches one Searcher replica; the others would load the new version on
    the first search that names it (hashing the whole index file first). Each replica watching
    CURRENT itself has it ready by the time the Ingress switches. Switching stays the Ingress's
    decision: this only loads. A version refused for what it is (ArtifactError: checksum, format)
    is not tried again (it is logged once; a search naming it still tries, and reports the error);
    any other failure (the store unreadable for a moment) is logged once and tried at the next poll.
    """

    def __init__(self, versions: Holder[T], read_current: Callable[[], Awaitable[str]]) -> None:
        self.versions = versions
        self.read_current = read_current
        self.failed: set[str] = set()
        self.last_transient: str | None = None

    async def preload_once(self) -> str | None:
        """Load CURRENT if this replica lacks it; the name loaded, or None."""
        try:
            name = await self.read_current()
        except Exception:
            return None  # the Ingress logs an unreadable CURRENT; nothing to load meanwhile
        if name in self.versions or name in self.failed:
            return None
        try:
            await self.versions.get(name)
        except ArtifactError as exc:
            self.failed.add(name)
            logger.warning("Searcher could not preload index version %s: %s", name, first_line(exc))
            return None
        except Exception as exc:
            reason = first_line(exc)
            if reason != self.last_transient:
                logger.warning("Searcher could not preload index version %s (will retry): %s", name, reason)
                self.last_transient = reason
            return None
        self.last_transient = None
        return name

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)  # a polling period, not a synchronisation
            await self.preload_once()
