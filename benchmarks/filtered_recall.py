"""Filtered search on an approximate (IVF) segment: recall@10 against brute force over the matching
subset, at 1% and 10% of the collection matching (issue 18: >= 0.95 each), and the latency of the
plan the planner picks (image_search/filtered_search.py: exact scan of few matches, else the index
with an id selector and nprobe raised by 1/selectivity). The segment's own nprobe is tuned first, as
the service tunes every IVF segment (`--untuned`: the planner's starting value instead).

    .venv/bin/python -m benchmarks.filtered_recall --n 1000000      # the issue's size (~5 min on 2 cores)
    .venv/bin/python -m benchmarks.filtered_recall --n 20000 --dim 64 --queries 50   # a quick check
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from benchmarks.clip_like_data import ClipLikeMixture, collection_and_queries
from benchmarks.common import machine_note, median, print_table, verdict
from image_search.faiss_index import apply_search_params, build_faiss_index
from image_search.filtered_search import (
    EXACT_SCAN_MAX_ROWS,
    IdFilter,
    SegmentRows,
    ivf_knobs,
    plan_scan,
    search_filtered,
)
from image_search.index_spec import choose_index_spec
from image_search.segment_search import searchable
from image_search.segments import tune_segment

K = 10
RECALL_TARGET = 0.95


def brute_force(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> np.ndarray:
    scores = queries @ vectors.T
    return ids[np.argsort(-scores, axis=1)[:, :K]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--fractions", default="0.01,0.1")
    parser.add_argument(
        "--untuned", action="store_true", help="keep the planner's starting nprobe instead of the tuned one"
    )
    args = parser.parse_args()
    print(machine_note())
    faiss.omp_set_num_threads(1)
    vectors, _, queries = collection_and_queries(
        ClipLikeMixture(dim=args.dim, clusters=max(10, args.n // 500)), args.n, args.queries
    )
    ids = np.arange(args.n, dtype=np.int64)
    spec = choose_index_spec(args.n, args.dim)
    if "IVF" not in spec.factory:
        raise SystemExit(f"the planner chose {spec.factory} for {args.n} vectors: no approximate index to measure")
    started = time.perf_counter()
    index = build_faiss_index(vectors, spec, ids)
    apply_search_params(index, spec.params)
    print(f"built {spec.factory} {spec.params} in {time.perf_counter() - started:.1f} s", flush=True)
    if not args.untuned:  # as the service's segments are: nprobe tuned to recall@10 0.95 unfiltered
        started = time.perf_counter()
        tuned = tune_segment(index, vectors, ids, spec)
        print(f"tuned nprobe {tuned.params.get('nprobe')} in {time.perf_counter() - started:.1f} s", flush=True)
    segment = searchable("bench", index, [])
    rows = SegmentRows.of(ids, vectors)
    nprobe, nlist = ivf_knobs(index)
    rng = np.random.default_rng(0)
    table, lines = [], []
    for fraction in (float(f) for f in args.fractions.split(",")):
        allowed = np.sort(rng.choice(ids, size=max(1, int(args.n * fraction)), replace=False))
        plan = plan_scan(len(allowed), args.n, nprobe, nlist)
        want = brute_force(vectors[allowed], allowed, queries)
        id_filter = IdFilter.of(allowed, args.n)
        latencies, recalls = [], []
        for q in range(len(queries)):
            began = time.perf_counter()
            _, got = search_filtered([segment], [rows], queries[q : q + 1], K, id_filter)
            latencies.append(time.perf_counter() - began)
            recalls.append(len(set(got[0].tolist()) & set(want[q].tolist())) / K)
        recall = float(np.mean(recalls))
        table.append(
            [
                f"{fraction:.0%}",
                len(allowed),
                plan.kind,
                plan.nprobe,
                f"{recall:.3f}",
                f"{median(latencies) * 1000:.1f}",
            ]
        )
        lines.append(verdict(f"recall@{K} with {fraction:.0%} matching", recall, RECALL_TARGET))
    print_table(
        f"filtered search, {args.n} x {args.dim}, nprobe {nprobe} of {nlist}, exact scan <= {EXACT_SCAN_MAX_ROWS}",
        ["matching", "ids", "plan", "nprobe", f"recall@{K}", "median ms"],
        table,
    )


if __name__ == "__main__":
    main()
