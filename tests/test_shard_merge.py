"""Shard merge equals one index (exact segments), and what a missing shard does. No Ray.

Real Searcher objects (the deployment's class, built by its own constructor, each holding its
shard's segments of a real multi-segment index written by the real builder code) are called
through a stand-in for Serve's handle (`handle.method.remote(...)`, here an in-process call), so
what is tested is the Ingress's `ShardedSearcher` over the Searchers' own methods: N shards give
what one Searcher over every segment gives, for plain, filtered, dedup, stored-vector and
duplicate-pair calls. The same over real Serve deployments is in tests/test_sharded_http.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ray.exceptions import RayActorError

from image_search.errors import Overloaded
from image_search.filtered_search import IdFilter
from image_search.segments import read_current_version
from image_search.storage import LocalStore
from serve_app.config import SearcherOptions
from serve_app.deployments.searcher import Searcher
from serve_app.sharded_searcher import (
    ShardedSearcher,
    ShardUnavailable,
    merge_pairs,
    merge_stored_vectors,
    partial_fields,
)
from tests.builds_without_a_model import DIM, fake_build, vector_of
from tests.test_segment_holdings import NO_MERGES

SEGMENT_SIZES = (40, 25, 17, 9, 4)  # five builds, five segments


class Method:
    def __init__(self, handle: LocalHandle, name: str) -> None:
        self.handle, self.name = handle, name

    def remote(self, *args: Any) -> Any:
        return self.handle.call(self.name, args)


class LocalHandle:
    """Serve's calling convention (`handle.method.remote(*args)` -> awaitable) over an in-process Searcher.

    `down`: every call fails as a dead replica does (RayActorError); `stalled`: calls wait until
    `release` is set (a shard that does not answer in time); `overloaded`: Serve's backpressure."""

    def __init__(self, searcher: Any) -> None:
        self.searcher = searcher
        self.down = False
        self.overloaded = False
        self.release: asyncio.Event | None = None
        self.calls: list[str] = []

    def options(self, **_: Any) -> LocalHandle:
        return self

    def __getattr__(self, name: str) -> Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return Method(self, name)

    async def call(self, name: str, args: tuple[Any, ...]) -> Any:
        self.calls.append(name)
        if self.down:
            raise RayActorError()
        if self.overloaded:
            raise Overloaded("busy")
        if self.release is not None:
            await self.release.wait()
        return await getattr(self.searcher, name)(*args)


def write_collection(folder: Path) -> list[bytes]:
    """Files in batches (one segment per build); some byte-identical, so duplicates span segments."""
    contents = []
    for batch, size in enumerate(SEGMENT_SIZES):
        for i in range(size):
            # Every 7th file repeats an earlier batch's bytes: a duplicate that lands in another segment.
            data = f"photo-{(batch - 1) if i % 7 == 0 and batch else batch}-{i}".encode() * 4
            (folder / f"b{batch}-{i:02d}.jpg").write_bytes(data)
            contents.append(data)
    return contents


@pytest.fixture(scope="module")
def index_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images = tmp_path_factory.mktemp("images")
    root = tmp_path_factory.mktemp("index")
    staging = tmp_path_factory.mktemp("all")
    write_collection(staging)
    for batch in range(len(SEGMENT_SIZES)):
        for path in sorted(staging.glob(f"b{batch}-*.jpg")):
            (images / path.name).write_bytes(path.read_bytes())
        fake_build(images, root, merge_policy=NO_MERGES)
    for name in ("b0-03.jpg", "b1-05.jpg", "b4-01.jpg"):  # deletions in three segments
        (images / name).unlink()
    fake_build(images, root, merge_policy=NO_MERGES)
    version = read_current_version(LocalStore(root))
    assert version is not None and len(version.segments) == len(SEGMENT_SIZES)
    return root


async def make_searcher(root: Path, options: SearcherOptions, shard: int, cache: Path) -> Any:
    cls = Searcher.func_or_class  # the deployment's class, constructed as Serve does (async __init__)
    searcher = object.__new__(cls)
    await searcher.__init__(str(root), options, str(cache), 3600.0, shard)
    return searcher


class Setup:
    def __init__(self, root: Path, cache: Path, shards: int, **options: Any) -> None:
        self.root, self.cache = root, cache
        self.options = SearcherOptions(shards=shards, **options)
        self.handles: list[LocalHandle] = []

    async def __aenter__(self) -> ShardedSearcher:
        for shard in range(self.options.shards):
            self.handles.append(LocalHandle(await make_searcher(self.root, self.options, shard, self.cache)))
        return ShardedSearcher(self.handles, self.options, DIM)  # type: ignore[arg-type]

    async def __aexit__(self, *_: object) -> None:
        for handle in self.handles:
            handle.searcher.preloading.cancel()


@pytest.fixture
def version(index_root: Path) -> str:
    found = read_current_version(LocalStore(index_root))
    assert found is not None
    return found.name


def queries(index_root: Path, count: int = 6) -> np.ndarray:
    """Some stored images' own vectors (exact hits and ties) and some new ones."""
    files = [f"photo-0-{i}".encode() * 4 for i in range(count // 2)]
    rng = np.random.default_rng(3)
    fresh = rng.normal(size=(count - len(files), DIM)).astype(np.float32)
    fresh /= np.linalg.norm(fresh, axis=1, keepdims=True)
    return np.concatenate([np.stack([vector_of(f) for f in files]), fresh]).astype(np.float32)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "cache"


@pytest.mark.parametrize("shards", [2, 3, 7])
def test_shard_merge_equals_one_index_on_exact_segments(
    index_root: Path, version: str, cache: Path, shards: int
) -> None:
    q = queries(index_root)

    async def answers(count: int) -> list[Any]:
        async with Setup(index_root, cache, count) as searcher:
            live = await searcher.prepare(version)
            prefix_ids = np.arange(0, 120, 3)
            id_filter = IdFilter.of(prefix_ids, 200)
            out: list[Any] = [live]
            for k in (1, 5, 30, 200):  # 200: more than the collection holds
                out.append((await searcher.search(q, k, version, live)).value)
                out.append((await searcher.search(q, k, version, live, id_filter)).value)
                rows = (await searcher.search_dedup(q, k, version, live, None, 0.95)).value
                out.append([(r.scores.tolist(), r.ids.tolist(), r.duplicates) for r in rows])
            out.append((await searcher.stored_vectors(np.array([0, 5, 3, 999, 90]), version)).value)
            pairs = await searcher.duplicate_pairs(version, 0.95)
            out.append((pairs.pairs.tolist(), pairs.complete))
            return out

    one, many = run(answers(1)), run(answers(shards))
    assert one[0] == many[0] == sum(SEGMENT_SIZES) - 3
    for single, sharded in zip(one[1:], many[1:], strict=True):
        if isinstance(single, tuple) and isinstance(single[0], np.ndarray):
            assert single[0].shape == sharded[0].shape
            np.testing.assert_array_equal(single[1], sharded[1])  # ids: same ranking, same tie-breaks
            np.testing.assert_array_equal(single[0], sharded[0])
        else:
            assert single == sharded
    assert len(one[-1][0]) > 0  # the duplicates were found (some across segments, so across shards)


def test_each_shard_loads_only_its_segments(index_root: Path, version: str, cache: Path) -> None:
    async def loads() -> list[list[str]]:
        async with Setup(index_root, cache, 2) as searcher:
            await searcher.prepare(version)
            return [sorted(handle.searcher.holdings.segment_loads) for handle in searcher.handles]  # type: ignore[attr-defined]

    first, second = run(loads())
    every = read_current_version(LocalStore(index_root))
    assert every is not None
    assert set(first).isdisjoint(second) and set(first) | set(second) == set(every.segment_names)


def test_a_shard_that_does_not_answer_in_time_is_a_503(index_root: Path, version: str, cache: Path) -> None:
    async def attempt() -> None:
        async with Setup(index_root, cache, 2, shard_timeout_s=0.2) as searcher:
            live = await searcher.prepare(version)
            searcher.handles[1].release = asyncio.Event()  # type: ignore[attr-defined]
            await searcher.search(queries(index_root), 5, version, live)

    with pytest.raises(ShardUnavailable) as raised:
        run(attempt())
    assert raised.value.status == 503 and raised.value.code == "shard_unavailable"
    assert "1" in raised.value.message


def test_with_allow_partial_the_other_shards_answer_and_say_which_is_missing(
    index_root: Path, version: str, cache: Path
) -> None:
    async def attempt() -> tuple[Any, Any, Any]:
        async with Setup(index_root, cache, 2, shard_timeout_s=0.2, allow_partial=True) as searcher:
            live = await searcher.prepare(version)
            whole = await searcher.search(queries(index_root), 10, version, live)
            searcher.handles[1].release = asyncio.Event()  # type: ignore[attr-defined]
            alone = await searcher.search(queries(index_root), 10, version, live)
            shard0 = await searcher.handles[0].searcher.search(queries(index_root), 10, version)  # type: ignore[attr-defined]
            return whole, alone, shard0

    whole, alone, shard0 = run(attempt())
    assert whole.missing == () and alone.missing == (1,)
    assert partial_fields(alone.missing) == {"partial": True, "missing_shards": [1]}
    assert partial_fields(()) == {}
    # What came back is shard 0's answer, in the full answer's shape (padded where shard 1 had the rest).
    assert alone.value[1].shape == whole.value[1].shape
    n = shard0[1].shape[1]
    np.testing.assert_array_equal(alone.value[1][:, :n], shard0[1])


def test_a_dead_shard_replica_is_retried_and_every_shard_dead_is_a_503_even_with_allow_partial(
    index_root: Path, version: str, cache: Path
) -> None:
    async def attempt() -> tuple[Any, list[str]]:
        async with Setup(index_root, cache, 2, allow_partial=True) as searcher:
            live = await searcher.prepare(version)
            for handle in searcher.handles:
                handle.down = True  # type: ignore[attr-defined]
            calls_before = len(searcher.handles[0].calls)  # type: ignore[attr-defined]
            try:
                await searcher.search(queries(index_root), 5, version, live)
            except ShardUnavailable as exc:
                return exc, searcher.handles[0].calls[calls_before:]  # type: ignore[attr-defined]
            raise AssertionError("no error")

    error, calls = run(attempt())
    assert error.status == 503
    assert calls == ["search"] * 3  # SEARCH_ATTEMPTS: sent again on (what Serve would pick as) another replica


def test_an_overloaded_shard_stays_an_overload(index_root: Path, version: str, cache: Path) -> None:
    async def attempt() -> None:
        async with Setup(index_root, cache, 2) as searcher:
            live = await searcher.prepare(version)
            searcher.handles[0].overloaded = True  # type: ignore[attr-defined]
            await searcher.search(queries(index_root), 5, version, live)

    with pytest.raises(Overloaded):
        run(attempt())


def test_loading_a_version_needs_every_shard(index_root: Path, version: str, cache: Path) -> None:
    async def attempt() -> None:
        async with Setup(index_root, cache, 2, allow_partial=True) as searcher:
            searcher.handles[1].down = True  # type: ignore[attr-defined]
            await searcher.prepare(version)

    with pytest.raises(ShardUnavailable):
        run(attempt())


def test_the_pure_merges() -> None:
    found, vectors = merge_stored_vectors(
        [
            (np.array([True, False, False]), np.array([[1.0], [0.0], [0.0]])),
            (np.array([False, False, True]), np.array([[9.0], [0.0], [3.0]])),
        ],
        3,
        1,
    )
    assert found.tolist() == [True, False, True] and vectors[:, 0].tolist() == [1.0, 0.0, 3.0]
    pairs, whole = merge_pairs([np.array([[1, 4], [0, 2]]), np.array([[0, 2], [3, 5]])])
    assert pairs.tolist() == [[0, 2], [1, 4], [3, 5]] and whole
    cut, whole = merge_pairs([np.array([[1, 4], [0, 2]])], max_pairs=1)
    assert cut.tolist() == [[0, 2]] and not whole
    empty, whole = merge_pairs([])
    assert empty.shape == (0, 2) and whole
