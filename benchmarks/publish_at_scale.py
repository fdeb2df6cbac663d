"""Publishing a change as a segment vs rebuilding the whole index (format 2), at collection scale.

Synthetic unit vectors (dim 512), no model, one local store in a temporary folder. In the same run:

- whole rebuild, what format 2 did for every change: `build_faiss_index` over all n vectors (the index
  `choose_index_spec(n)` calls for), `write_index_file`, `file_sha256`;
- segment publish of the same change (1,000 added, 1,000 changed, 100 removed): one new segment of
  the 2,000 new vectors plus 1,100 deletions in the big segment, a version file and CURRENT, bytes
  counted through the store;
- the time until a Searcher holding the old version's segments serves the new one: read the version
  file, load and verify only the new segment, build the id selectors;
- search p50/p99 (one query, k 10) at 1 segment and at the merge policy's maximum segment count for
  n (the big segment plus small ones the size of one change);
- compaction of everything into one segment (the index its size calls for, IVF at 1M) vs the whole
  rebuild.

    .venv/bin/python -m benchmarks.publish_at_scale [--n 1000000] [--queries 300]

The publish is the part that must not grow with n; reading the published records for the diff
(`records.json` of every segment) is printed too, because it does.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_note, percentile, print_table, verdict
from image_search.artifact import RetentionPolicy, new_version_name
from image_search.faiss_index import build_faiss_index, write_index_file
from image_search.index_spec import choose_index_spec
from image_search.manifest import ImageRecord
from image_search.merge_policy import MergePolicy
from image_search.segment_search import search_segments, searchable
from image_search.segments import (
    Version,
    build_segment,
    commit_version,
    file_sha256,
    open_segment_index,
    read_contents,
    read_version,
    with_changes,
)
from image_search.storage import LocalStore
from index_builder.build import compact

DIM = 512
ADDED, CHANGED, REMOVED = 1_000, 1_000, 100
PUBLISH_SECONDS_TARGET = 2.0
PUBLISH_BYTES_TARGET = 0.01
P99_RATIO_TARGET = 1.3
K = 10


class CountingStore(LocalStore):
    """A local store that counts the bytes written through write_bytes/write_file (segments: see below)."""

    def __init__(self, location: Path) -> None:
        super().__init__(location)
        self.written = 0

    def write_bytes(self, key: str, data: bytes) -> None:
        self.written += len(data)
        super().write_bytes(key, data)

    def write_file(self, key: str, path: Path) -> None:
        self.written += Path(path).stat().st_size
        super().write_file(key, path)


def unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    vectors = rng.standard_normal((n, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def records_for(ids: np.ndarray, salt: str = "") -> list[ImageRecord]:
    return [
        ImageRecord(int(i), f"photos/{int(i):08d}.jpg", 150_000, hashlib.sha256(f"{i}{salt}".encode()).hexdigest())
        for i in ids
    ]


def latencies(segments: list, queries: np.ndarray) -> list[float]:  # type: ignore[type-arg]
    times = []
    for query in queries:
        started = time.perf_counter()
        search_segments(segments, query[None, :], K)
        times.append(time.perf_counter() - started)
    return times


def run(n: int, query_count: int) -> None:
    print(f"publish_at_scale: n={n}, dim {DIM}; {machine_note()}", flush=True)
    rng = np.random.default_rng(0)
    vectors = unit_vectors(rng, n)
    ids = np.arange(n, dtype=np.int64)
    spec = choose_index_spec(n, DIM)
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="publish-at-scale-") as work:
        root = Path(work)
        store = CountingStore(root / "index")
        cache = root / "cache"

        # The change, and the collection after it (what a whole rebuild indexes).
        changed_ids = rng.choice(n, CHANGED + REMOVED, replace=False)
        edited, removed = np.sort(changed_ids[:CHANGED]), np.sort(changed_ids[CHANGED:])
        new_ids = np.concatenate([edited, np.arange(n, n + ADDED)])
        new_vectors = unit_vectors(rng, len(new_ids))
        after = vectors.copy()
        after[edited] = new_vectors[:CHANGED]
        keep = np.setdiff1d(ids, removed)
        all_ids = np.concatenate([keep, np.arange(n, n + ADDED)])
        all_vectors = np.concatenate([after[keep], new_vectors[CHANGED:]])

        print("whole rebuild (format 2) ...", flush=True)
        started = time.perf_counter()
        index = build_faiss_index(all_vectors, choose_index_spec(len(all_ids), DIM), all_ids)
        write_index_file(index, root / "whole.faiss")
        file_sha256(root / "whole.faiss")
        whole_s = time.perf_counter() - started
        whole_bytes = (root / "whole.faiss").stat().st_size
        del index
        (root / "whole.faiss").unlink()
        rows.append(["whole rebuild of the index (format 2)", whole_s, whole_bytes / 2**20])

        print("initial segment (setup) ...", flush=True)
        started = time.perf_counter()
        big = build_segment(store, ids, vectors, records_for(ids), DIM, spec)
        first = Version(new_version_name(), "bench", "fp", DIM, {}, "fp32", "/photos", (big,), {}, n)
        commit_version(store, first)
        rows.append(
            [f"setup: first segment of {n} ({spec.factory}, not a target)", time.perf_counter() - started, None]
        )

        started = time.perf_counter()
        contents = read_contents(store, read_version(store, first.name))
        rows.append(["read published records (diff input; grows with n)", time.perf_counter() - started, None])
        del contents

        # A Searcher holding the first version: the big segment loaded and ready.
        held = {big.name: open_segment_index(store, big, cache)}

        print("segment publish of the change ...", flush=True)
        store.written = 0
        started = time.perf_counter()
        order = np.argsort(new_ids)
        segment = build_segment(store, new_ids[order], new_vectors[order], records_for(new_ids[order], "v2"), DIM)
        second = with_changes(
            first,
            name=new_version_name(),
            add=[segment],
            delete={big.name: np.concatenate([edited, removed]).tolist()},
            next_id=n + ADDED,
        )
        commit_version(store, second)
        publish_s = time.perf_counter() - started
        # A local store writes a segment in place (not through write_file): count its files too.
        publish_bytes = store.written + (segment.bytes if store.local_path("x") is not None else 0)
        rows.append([f"segment publish (+{ADDED}, ~{CHANGED}, -{REMOVED})", publish_s, publish_bytes / 2**20])

        started = time.perf_counter()
        served = read_version(store, second.name)
        for info in served.segments:
            if info.name not in held:
                held[info.name] = open_segment_index(store, info, cache)
        loaded = [searchable(s.name, held[s.name], served.deleted_ids(s.name)) for s in served.segments]
        swap_s = time.perf_counter() - started
        rows.append(["until a Searcher serves the new version (loads 1 segment)", swap_s, None])

        queries = unit_vectors(np.random.default_rng(1), query_count)
        one = [searchable(big.name, held[big.name], [])]
        max_segments = MergePolicy().max_segments(n)
        extra = []
        for i in range(max_segments - 1):
            small_ids = np.arange(n + ADDED + i * 2 * ADDED, n + ADDED + (i + 1) * 2 * ADDED)
            small = build_segment(store, small_ids, unit_vectors(rng, len(small_ids)), records_for(small_ids), DIM)
            extra.append(searchable(small.name, open_segment_index(store, small, cache), []))
        many = [loaded[0], *extra]  # the big segment with its deletions, plus small ones
        latencies(one, queries[:20])  # warm up
        one_times, many_times = [], []
        for query_block in np.array_split(queries, 10):  # interleaved: the same load for both
            one_times += latencies(one, query_block)
            many_times += latencies(many, query_block)
        rows.append(["search p50, 1 segment (ms)", percentile(one_times, 50) * 1000, None])
        rows.append(["search p99, 1 segment (ms)", percentile(one_times, 99) * 1000, None])
        rows.append([f"search p50, {len(many)} segments = policy max (ms)", percentile(many_times, 50) * 1000, None])
        rows.append([f"search p99, {len(many)} segments = policy max (ms)", percentile(many_times, 99) * 1000, None])

        print("compaction into one segment (the builder's compact) ...", flush=True)
        started = time.perf_counter()
        compacted = compact(store, served, RetentionPolicy(), MergePolicy(), force=True)
        compact_s = time.perf_counter() - started
        assert compacted is not None and len(compacted.segments) == 1
        (merged,) = compacted.segments
        rows.append([f"compaction of all into one segment ({merged.spec.factory})", compact_s, merged.bytes / 2**20])

    print_table(f"Publishing a change at n={n}", ["step", "seconds (or ms)", "MiB written"], rows)
    verdict("segment publish seconds", publish_s, PUBLISH_SECONDS_TARGET, higher_is_better=False, unit=" s")
    verdict("segment publish bytes / whole rebuild bytes", publish_bytes / whole_bytes, PUBLISH_BYTES_TARGET, False)
    ratio = percentile(many_times, 99) / percentile(one_times, 99)
    verdict(f"search p99 at {len(many)} segments / 1 segment", ratio, P99_RATIO_TARGET, higher_is_better=False)
    verdict("compaction seconds / whole rebuild seconds", compact_s / whole_s, 1.0, higher_is_better=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the collection (default 1,000,000)")
    parser.add_argument("--queries", type=int, default=300, help="single-query searches per configuration")
    args = parser.parse_args()
    if args.n <= CHANGED + REMOVED:
        parser.error(f"--n must be above {CHANGED + REMOVED}")
    run(args.n, args.queries)


if __name__ == "__main__":
    main()
