"""FAISS's OpenMP setting holds on the thread where searches run (serve_app/search_thread.py)."""

from __future__ import annotations

import asyncio
import threading

import faiss
import numpy as np

from serve_app.search_thread import SearchThread


def test_thread_count_is_set_on_the_search_thread_not_the_caller() -> None:
    before = faiss.omp_get_max_threads()
    wanted = before + 2  # differs from whatever this process starts with
    searching = SearchThread(wanted)
    try:
        assert searching.omp_threads() == wanted
        # Not a process-wide setting: a fresh thread (like Serve's pool threads) does not see it.
        seen: list[int] = []
        other = threading.Thread(target=lambda: seen.append(faiss.omp_get_max_threads()))
        other.start()
        other.join()
        assert seen == [before]
        assert faiss.omp_get_max_threads() == before
    finally:
        searching.close()


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
        searching.close()
    assert [found for _, found in answers] == [0, 1, 2, 3]
    assert len({name for name, _ in answers}) == 1 and answers[0][0].startswith("faiss-search")
