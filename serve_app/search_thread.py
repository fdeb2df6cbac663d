"""One dedicated thread for a Searcher's FAISS calls, with its OpenMP team size set on that thread.

`faiss.omp_set_num_threads` sets the calling thread's OpenMP setting only. Serve runs a replica's
sync methods on a thread pool, so a call in `__init__` would not reach the threads that search
(they start with OMP_NUM_THREADS, which Ray sets to the replica's CPU share, i.e. 1 for 0.25 CPU).
Every search runs here instead: the setting holds where it matters, and one thread keeps one warm
OpenMP team instead of one per pool thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import faiss

T = TypeVar("T")


class SearchThread:
    def __init__(self, num_threads: int, name: str = "faiss-search") -> None:
        self.num_threads = num_threads
        self.executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name, initializer=faiss.omp_set_num_threads, initargs=(num_threads,)
        )

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def omp_threads(self) -> int:
        """The OpenMP team size FAISS uses on the search thread (what operators and tests check)."""
        return int(self.executor.submit(faiss.omp_get_max_threads).result())
