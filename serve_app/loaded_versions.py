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
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

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
