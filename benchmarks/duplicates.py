"""GET /duplicates' computation at collection scale: the range search of every live vector
(image_search/duplicate_pairs.py) and the grouping (serve_app/queries/duplicate_groups.py), timed,
with its peak memory, against brute force measured in the same run (issue 18 item 6: "bounded in
time and memory (measure it at 100k images)").

The collection: CLIP-like vectors (benchmarks/clip_like_data.py; two different images of one topic
sit below cosine ~0.9) with planted duplicates: `--copies` of the rows are exact copies of another
row (the same file twice), `--near` are re-encodings (the vector of another row plus noise, cosine
0.96-0.995 to it). Indexed as the service would at this size (`choose_segment_index_spec`: one Flat
segment up to 100k), optionally split into `--segments` segments (IVF ones of a larger collection
get their nprobe tuned as the service's are). Above `EXACT_PAIRS_MAX_ROWS` live vectors the scan
runs on duplicate_pairs' temporary coarse IVF-SQ8, so it is approximate: what it misses is measured.

Reported: seconds and peak memory (RSS sampled every 20 ms, above what the process held before) of
`duplicate_pairs` with the service's bounds (`MAX_DUPLICATE_PAIRS`, `MAX_DUPLICATE_SECONDS`, or
`--max-seconds`), whether it completed, pairs and groups found, the share of planted pairs found,
and the recall check: for `--check-rows` random rows, the share of the pairs brute force finds (numpy
matrix product) that are among the pairs found (every pair found is checked on the stored vectors,
so none is false). The baseline is that brute force's time per row, times n.

    .venv/bin/python -m benchmarks.duplicates [--n 100000] [--threshold 0.95] [--segments 1]
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.clip_like_data import ClipLikeMixture, ClipLikeSampler
from benchmarks.common import machine_note, print_table, verdict
from image_search.duplicate_pairs import (
    EXACT_PAIRS_MAX_ROWS,
    MAX_DUPLICATE_PAIRS,
    MAX_DUPLICATE_SECONDS,
    duplicate_pairs,
)
from image_search.faiss_index import build_faiss_index
from image_search.filtered_search import SegmentRows
from image_search.index_spec import choose_segment_index_spec
from image_search.segment_search import searchable
from image_search.segments import tune_segment
from serve_app.queries.duplicate_groups import group_pairs

CHECK_BLOCK = 512
FOUND_TARGET = 0.99  # share of planted / brute-force pairs found (1.0 where the scan is exact)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """The highest RSS seen while the block runs, sampled from another thread."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.before = rss_bytes()
        self.peak = self.before
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def collection(n: int, dim: int, copies: float, near: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, planted pairs (m, 2) of rows, lower first): exact copies and re-encodings of other rows."""
    vectors, _ = ClipLikeSampler(ClipLikeMixture(dim=dim, clusters=max(10, n // 500), seed=seed)).draw(n, seed + 1)
    rng = np.random.default_rng(seed + 2)
    planted_copies, planted_near = int(n * copies), int(n * near)
    rows = rng.choice(n, size=2 * (planted_copies + planted_near), replace=False)
    sources, targets = rows[: len(rows) // 2], rows[len(rows) // 2 :]
    vectors[targets[:planted_copies]] = vectors[sources[:planted_copies]]
    near_sources, near_targets = sources[planted_copies:], targets[planted_copies:]
    noise = rng.standard_normal((len(near_targets), dim)).astype(np.float32)
    noise -= np.sum(noise * vectors[near_sources], axis=1, keepdims=True) * vectors[near_sources]
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    cosine = rng.uniform(0.96, 0.995, size=(len(near_targets), 1)).astype(np.float32)
    vectors[near_targets] = cosine * vectors[near_sources] + np.sqrt(1 - cosine**2) * noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    planted = np.sort(np.stack([sources, targets], axis=1), axis=1)
    return vectors, planted


def brute_force_pairs(vectors: np.ndarray, rows: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """Every pair (lower first) involving one of `rows` with cosine >= threshold, by numpy matrix products."""
    pairs: set[tuple[int, int]] = set()
    for start in range(0, len(rows), CHECK_BLOCK):
        block = rows[start : start + CHECK_BLOCK]
        scores = vectors[block] @ vectors.T
        for query, other in zip(*np.nonzero(scores >= np.float32(threshold)), strict=True):
            a, b = int(block[query]), int(other)
            if a != b:
                pairs.add((min(a, b), max(a, b)))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threshold", type=float, default=0.95, help="cosine (the service's dedup_cosine default)")
    parser.add_argument("--copies", type=float, default=0.01, help="share of rows that are exact copies of another")
    parser.add_argument("--near", type=float, default=0.01, help="share of rows that are re-encodings of another")
    parser.add_argument("--segments", type=int, default=1, help="split the collection into this many segments")
    parser.add_argument("--check-rows", type=int, default=2000, help="rows checked against brute force")
    parser.add_argument("--max-seconds", type=float, default=MAX_DUPLICATE_SECONDS, help="the scan's time bound")
    args = parser.parse_args()
    print(f"duplicates: n={args.n}, dim {args.dim}, threshold {args.threshold}; {machine_note()}", flush=True)
    vectors, planted = collection(args.n, args.dim, args.copies, args.near, seed=0)
    ids = np.arange(args.n, dtype=np.int64)
    segments, rows, factories = [], [], set()
    started = time.perf_counter()
    for number, part in enumerate(np.array_split(ids, args.segments)):
        spec = choose_segment_index_spec(len(part), args.n, args.dim)
        factories.add(spec.factory)
        index = build_faiss_index(vectors[part], spec, part)
        tune_segment(index, vectors[part], part, spec)  # IVF: nprobe as the service tunes it (Flat: nothing)
        segments.append(searchable(f"s{number}", index, []))
        rows.append(SegmentRows.of(part, vectors[part]))
    build_s = time.perf_counter() - started

    scan_kind = "coarse IVF-SQ8, pairs checked exactly" if args.n > EXACT_PAIRS_MAX_ROWS else "segment indexes"
    print("duplicate_pairs ...", flush=True)
    with PeakRss() as memory:
        started = time.perf_counter()
        found = duplicate_pairs(segments, rows, args.threshold, MAX_DUPLICATE_PAIRS, args.max_seconds)
        scan_s = time.perf_counter() - started
    started = time.perf_counter()
    groups = group_pairs(map(tuple, found.pairs.tolist()))
    group_s = time.perf_counter() - started

    print("brute force of the checked rows ...", flush=True)
    check = np.sort(np.random.default_rng(1).choice(args.n, size=min(args.check_rows, args.n), replace=False))
    started = time.perf_counter()
    truth = brute_force_pairs(vectors, check, args.threshold)
    brute_s = time.perf_counter() - started
    brute_estimate_s = brute_s * args.n / len(check)
    found_set = set(map(tuple, found.pairs.tolist()))
    missed = len(truth - found_set)
    recall = 1.0 - missed / max(1, len(truth))
    planted_above = [
        (int(a), int(b)) for a, b in planted if float(vectors[a] @ vectors[b]) >= args.threshold
    ]  # a re-encoding can fall just below the threshold
    planted_found = sum(pair in found_set for pair in planted_above) / max(1, len(planted_above))

    rows_out: list[list[object]] = [
        [f"build {args.segments} segment(s) ({', '.join(sorted(factories))}, not a target)", build_s, None],
        [
            f"duplicate_pairs: range search of every live vector ({scan_kind})",
            scan_s,
            (memory.peak - memory.before) / 2**20,
        ],
        [f"  complete (bounds {MAX_DUPLICATE_PAIRS} pairs, {args.max_seconds:g} s)", found.complete, None],
        ["  pairs found", len(found.pairs), None],
        ["group_pairs: groups (union-find)", group_s, None],
        ["  groups", len(groups), None],
        [f"planted pairs at or above {args.threshold} found (of {len(planted_above)})", planted_found, None],
        [f"brute-force pairs of {len(check)} rows missed (of {len(truth)})", missed, None],
        ["  recall of brute-force pairs", recall, None],
        [f"baseline: numpy brute force, {len(check)} rows x n, scaled to n rows", brute_estimate_s, None],
    ]
    print_table(f"Duplicate pairs at n={args.n}", ["step", "seconds (or value)", "peak MiB above start"], rows_out)
    verdict("duplicate_pairs seconds / brute force estimate", scan_s / brute_estimate_s, 1.0, higher_is_better=False)
    verdict("planted pairs found", planted_found, FOUND_TARGET)
    verdict(f"brute-force pairs of {len(check)} rows found", recall, FOUND_TARGET)
    verdict("completed within the service's bounds", float(found.complete), 1.0)


if __name__ == "__main__":
    main()
