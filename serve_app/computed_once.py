"""Expensive per-key results computed once, however many callers ask at the same time.

A replica that is asked for the same costly answer by several requests at once (the duplicate
pairs of a version: one range search over the whole index) should run it once and let every
caller await that one run. The last `entries` keys are kept; a failed or cancelled run is
forgotten so the next caller tries again, and a caller that gives up (its request cancelled)
does not cancel the run the others are waiting for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ComputedOnce(Generic[K, V]):
    def __init__(self, entries: int) -> None:
        if entries < 1:
            raise ValueError("ComputedOnce keeps at least one entry")
        self.entries = entries
        self._runs: dict[K, asyncio.Future[V]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._runs

    async def get(self, key: K, compute: Callable[[], Awaitable[V]]) -> V:
        run = self._runs.get(key)
        if run is None:
            run = asyncio.ensure_future(compute())
            self._runs[key] = run
            run.add_done_callback(lambda done: self._forget_failed(key, done))
            while len(self._runs) > self.entries:
                # Oldest first; a run still in flight keeps going for those already awaiting it.
                self._runs.pop(next(iter(self._runs)))
        return await asyncio.shield(run)

    def _forget_failed(self, key: K, run: asyncio.Future[V]) -> None:
        if (run.cancelled() or run.exception() is not None) and self._runs.get(key) is run:
            del self._runs[key]
