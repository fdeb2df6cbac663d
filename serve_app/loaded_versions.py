"""The index versions one Searcher replica holds: a few, loaded on demand, the least recently used dropped.

Each search names its version. During a handover the Ingress still sends the old version for the
requests that started before it, and the new one for the rest, so a replica holds both for a
while. Another Ingress replica (or one that just restarted) may name a version this replica has
not seen: it is loaded then, once, however many requests ask for it at the same moment. Indexes are
memory-mapped, so holding a version costs page cache shared with the other replicas on the node,
not a private copy; dropping one unmaps it once the last search that used it returns.

No Ray and no FAISS here: the loader is a callable, so this is unit-tested directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

logger = logging.getLogger("ray.serve")

T = TypeVar("T")


class LoadedVersions(Generic[T]):
    def __init__(self, capacity: int, load: Callable[[str], T]) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.load = load
        self.items: OrderedDict[str, T] = OrderedDict()
        self.loading: dict[str, asyncio.Future[T]] = {}

    def names(self) -> list[str]:
        """Held versions, most recently used last."""
        return list(self.items)

    def newest(self) -> T | None:
        return next(reversed(self.items.values()), None)

    async def get(self, name: str) -> T:
        """The loaded version `name`, loading it (off the event loop) if this replica lacks it."""
        item = self.items.get(name)
        if item is not None:
            self.items.move_to_end(name)
            return item
        pending = self.loading.get(name)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self.loading[name] = pending
            try:
                loaded = await asyncio.to_thread(self.load, name)
            except Exception as exc:
                # Everyone waiting gets the same error; the next request tries again.
                pending.set_exception(exc)
                pending.exception()  # retrieved: no "never retrieved" warning when nobody else waited
                raise
            except BaseException:  # cancelled: the waiters are cancelled with it
                pending.cancel()
                raise
            finally:
                del self.loading[name]
            pending.set_result(loaded)
            self.put(name, loaded)
            return loaded
        return await asyncio.shield(pending)

    def put(self, name: str, item: T) -> None:
        self.items[name] = item
        self.items.move_to_end(name)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)


class Preloader(Generic[T]):
    """Loads each newly published version into a Searcher ahead of the Ingress's switch.

    The Ingress's `prepare` reaches one Searcher replica; the others would load the new version on
    the first search that names it (hashing the whole index file first). Each replica watching
    CURRENT itself has it ready by the time the Ingress switches. Switching stays the Ingress's
    decision: this only loads. A version that fails to load is not retried (it is logged once;
    a search naming it still tries, and reports the error).
    """

    def __init__(self, versions: LoadedVersions[T], read_current: Callable[[], Awaitable[str]]) -> None:
        self.versions = versions
        self.read_current = read_current
        self.failed: set[str] = set()

    async def preload_once(self) -> str | None:
        """Load CURRENT if this replica lacks it; the name loaded, or None."""
        try:
            name = await self.read_current()
        except Exception:
            return None  # the Ingress logs an unreadable CURRENT; nothing to load meanwhile
        if name in self.versions.items or name in self.failed:
            return None
        try:
            await self.versions.get(name)
        except Exception as exc:
            self.failed.add(name)
            logger.warning("Searcher could not preload index version %s: %s", name, str(exc).splitlines()[0][:500])
            return None
        return name

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)  # a polling period, not a synchronisation
            await self.preload_once()
