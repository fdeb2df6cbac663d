"""FAISS's OpenMP setting holds on the thread where searches run (serve_app/search_thread.py)."""

from __future__ import annotations

import asyncio
import threading

import faiss
import numpy as np

from serve_app.search_thread import SearchThread


def threads_seen_by_a_fresh_thread() -> int:
    """What a new thread (like one of Serve's pool threads) gets: OpenMP's default, not its creator's setting."""
    seen: list[int] = []
    other = threading.Thread(target=lambda: seen.append(faiss.omp_get_max_threads()))
    other.start()
    other.join()
    return seen[0]


def test_thread_count_is_set_on_the_search_thread_not_the_caller() -> None:
    # Measured, not assumed: earlier tests in this process may have changed the main thread's setting.
    fresh_default = threads_seen_by_a_fresh_thread()
    caller = faiss.omp_get_max_threads()
    wanted = max(fresh_default, caller) + 2  # differs from both
    searching = SearchThread(wanted)
    try:
        assert searching.omp_threads() == wanted
        # Not a process-wide setting: neither the caller nor a fresh thread sees it.
        assert threads_seen_by_a_fresh_thread() == fresh_default
        assert faiss.omp_get_max_threads() == caller
    finally:
        searching.executor.shutdown(wait=False)


def test_searches_run_on_the_one_search_thread() -> None:
    index = faiss.IndexFlatIP(4)
    index.add(np.eye(4, dtype=np.float32))
    searching = SearchThread(1)

    def search_and_name(queries: np.ndarray) -> tuple[str, int]:
        _, ids = index.search(queries, 1)
        return threading.current_thread().name, int(ids[0, 0])

    async def scenario() -> list[tuple[str, int]]:
        return await asyncio.gather(
            *(searching.run(search_and_name, np.eye(4, dtype=np.float32)[[i]]) for i in range(4))
        )

    try:
        answers = asyncio.run(scenario())
    finally:
        searching.executor.shutdown(wait=False)
    assert [found for _, found in answers] == [0, 1, 2, 3]
    assert len({name for name, _ in answers}) == 1 and answers[0][0].startswith("faiss-search")
