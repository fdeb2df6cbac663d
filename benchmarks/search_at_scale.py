"""FAISS at collection scale on CLIP-like data: every index type vs exact search (not part of CI).

Data (benchmarks/clip_like_data.py): N x 512 unit vectors from a mixture shaped like CLIP image
embeddings: `--clusters` topics with Zipf sizes (share of topic r ~ 1/r), topic centres in a cone
(two centres at cosine ~0.6, as unrelated CLIP images sit at ~0.4), each member at a cosine drawn
uniformly from 0.7-0.9 to its topic centre with anisotropic noise (variance of the j-th direction
~1/j). Queries are fresh draws from the same mixture, never vectors of the indexed set. Ground truth
is the exact inner-product top-10 over all N vectors. On this data IVF settings differ visibly
(nprobe 8 and 64 are printed for every IVF index), unlike the equal-sized easy clusters used before.

Per index type, built the service's way (`build_faiss_index`: an IDMap2 around the factory's index,
k-means on `TRAINING_POINTS_PER_LIST` points a list) with the list count the planner uses at N:
Flat, IVF{K},Flat, IVF{K},SQ8, OPQ{m}_{d'},IVF{K},PQ{m}x8 (m = d/8: 64 bytes a vector at 512-d) and
HNSW32. Columns: recall@10 of the fresh queries vs exact, p50/p99 of one query per call on one
thread (how a Searcher replica runs), the written index size and the planner's memory formula
(`index_memory_bytes`, IDMap2's reverse map included), build time. For IVF and HNSW: a sweep of
nprobe / efSearch, then the value `recall_tuning.tune_recall` picks for recall@10 >= `--target` on
held-out vectors of the collection itself ("tuned"), and the recall that value gets on the fresh
queries (does tuning on the collection carry over to new queries?). Last, the planner's choice by
formula at N, 10M, 100M and 1B for a few budgets, and a rough time for the same run at 1M.

`--memory-only` measures PSS of 2 processes mapping the service's index file (issue 9), unchanged.

    .venv/bin/python -m benchmarks.search_at_scale [--n 1000000] [--types ivf_flat,ivf_sq8,...]
        [--nprobe 8 --nprobe 64 ...] [--target 0.95] [--budget BYTES]
    .venv/bin/python -m benchmarks.search_at_scale --n 50000   # a check: ~12 min on 2 cores, 8 of them OPQ training
    .venv/bin/python -m benchmarks.search_at_scale --n 50000 --types flat,ivf_flat,ivf_sq8,hnsw   # ~2 min
    .venv/bin/python -m benchmarks.search_at_scale --memory-only [--n 1000000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from benchmarks.clip_like_data import ClipLikeMixture, collection_and_queries, cosine_to_topic_mean
from benchmarks.common import machine_note, print_table, verdict
from image_search.faiss_index import build_faiss_index
from image_search.index_planner import (
    DEFAULT_MAX_INDEX_MEMORY,
    GiB,
    IndexDoesNotFit,
    human_bytes,
    index_memory_bytes,
    ivf_factory,
    ivf_list_count,
    plan_index,
    uses_hnsw_quantizer,
)
from image_search.index_spec import IndexSpec, choose_index_spec
from image_search.recall_tuning import set_knob, single_query_latency_ms, tune_recall

DIM = 512
K = 10
TYPES = ("flat", "ivf_flat", "ivf_sq8", "ivf_pq", "hnsw")
PLANNER_SIZES = (10_000_000, 100_000_000, 1_000_000_000)
PLANNER_BUDGETS = (DEFAULT_MAX_INDEX_MEMORY, 24 * GiB, 128 * GiB, 1024 * GiB)
VISIBLY_DIFFERENT = 0.05  # recall@10 gap between nprobe 8 and 64 that shows the data tells them apart
ONE_MILLION = 1_000_000
CHUNK = 100_000


@dataclass
class Row:
    index: str
    setting: str
    recall: float
    p50_ms: float
    p99_ms: float
    written_mib: float
    formula_mib: float
    build_s: float


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth, strict=True))
    return hits / truth.size


def factories(n: int, dim: int, types: list[str], pq_m: int) -> dict[str, str]:
    lists, hnsw = ivf_list_count(n), uses_hnsw_quantizer(n)
    every = {
        "flat": "Flat",
        "ivf_flat": ivf_factory(lists, hnsw, "Flat", dim),
        "ivf_sq8": ivf_factory(lists, hnsw, "SQ8", dim),
        "ivf_pq": ivf_factory(lists, hnsw, f"PQ{pq_m}", dim),
        "hnsw": "HNSW32",
    }
    return {kind: every[kind] for kind in types}


def measure(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, timed: int) -> tuple[float, float, float]:
    _, found = index.search(queries, K)  # batched, all threads: recall only
    p50, p99 = single_query_latency_ms(index, queries[:timed], K)
    return recall_at_k(found, truth), p50, p99


def run_type(
    kind: str, factory: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace
) -> tuple[list[Row], float]:
    """The rows of one index type and its build seconds."""
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    index = build_faiss_index(vectors, IndexSpec(factory))
    build_s = time.perf_counter() - started
    written = len(faiss.serialize_index(index)) / 2**20
    formula = index_memory_bytes(factory, len(vectors), vectors.shape[1]) / 2**20
    print(f"  built {factory} in {build_s:.1f}s, written {written:.0f} MiB, formula {formula:.0f} MiB", flush=True)

    def row(setting: str) -> Row:
        recall, p50, p99 = measure(index, queries, truth, args.timed_queries)
        print(f"    {setting}: recall@10 {recall:.3f}, p50 {p50:.3f} ms, p99 {p99:.3f} ms", flush=True)
        return Row(factory, setting, recall, p50, p99, written, formula, build_s)

    if kind == "flat":
        return [row("exact")], build_s
    param = "ef_search" if kind == "hnsw" else "nprobe"
    sweep = args.ef_search if kind == "hnsw" else args.nprobe
    rows = []
    for value in sweep:
        set_knob(index, param, value)
        rows.append(row(f"{param} {value}"))
    started = time.perf_counter()
    tuned = tune_recall(index, vectors, target=args.target, sample_queries=args.tune_queries)
    print(
        f"    tuned in {time.perf_counter() - started:.1f}s on {tuned.queries} held-out vectors: "
        f"{param} {tuned.value}, "
        f"held-out recall {tuned.recall:.3f}{'' if tuned.met else ' (TARGET NOT MET: best found)'}",
        flush=True,
    )
    rows.append(row(f"{param} {tuned.value} (tuned{'' if tuned.met else ', target missed'})"))
    return rows, build_s


def planner_table(n: int) -> None:
    rows = []
    for count in (n, *PLANNER_SIZES):
        for budget in PLANNER_BUDGETS:
            try:
                plan = plan_index(count, DIM, budget)
                rows.append(
                    [f"{count:,}", human_bytes(budget), plan.factory, human_bytes(plan.estimated_bytes), plan.reason]
                )
            except IndexDoesNotFit as exc:
                rows.append([f"{count:,}", human_bytes(budget), "(does not fit)", "-", str(exc)])
    print_table(
        f"Planner's choice by formula (d={DIM}, recall target 0.95, mapped, IDMap2 ids)",
        ["vectors", "budget", "factory", "estimate", "reason"],
        rows,
    )


def time_at_one_million(n: int, phases: dict[str, tuple[float, float]]) -> None:
    """Rough scaling of this run's phases (build seconds, other seconds) to 1M vectors.

    IVF builds: assigning every vector to K lists (k-means' sample grows with K too) ~ n * K; an
    OPQ/PQ build adds codebook training on a bounded sample (FAISS caps OPQ at 65536 points), taken
    as the same as here; HNSW builds ~ n log n; the exact scan, sweeps and tuning ~ n.
    """
    scale = ONE_MILLION / n
    ivf = scale * ivf_list_count(ONE_MILLION) / ivf_list_count(n)
    ivf_build_here = phases.get("ivf_flat", phases.get("ivf_sq8", (0.0, 0.0)))[0]
    estimates = {}
    for phase, (build_s, other_s) in phases.items():
        if phase == "ivf_pq":
            built = (build_s - ivf_build_here) + ivf_build_here * ivf
        elif phase.startswith("ivf"):
            built = build_s * ivf
        elif phase == "hnsw":
            built = build_s * scale * np.log(ONE_MILLION) / np.log(n)
        else:
            built = build_s * scale
        estimates[phase] = built + other_s * scale
    parts = ", ".join(f"{phase} {seconds / 60:.0f}" for phase, seconds in estimates.items())
    print(
        f"\nRough time for the same run at n=1,000,000 on this machine: ~{sum(estimates.values()) / 60:.0f} min "
        f"({parts} min; see time_at_one_million for the assumptions)"
    )


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB from /proc/PID/smaps_rollup."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in ("Rss:", "Pss:"):
            values[parts[0]] = int(parts[1])
    return values["Rss:"], values["Pss:"]


# --- the service's way: builder format, mapped by open_index ---------------------------------------

SERVICE_CHILD = """
import sys, faiss, numpy as np
from pathlib import Path
from image_search.faiss_index import map_index_file, read_index_file
path, how = Path(sys.argv[1]), sys.argv[2]
index = map_index_file(path) if how == "map" else read_index_file(path)
faiss.omp_set_num_threads(1)
q = np.random.default_rng(0).standard_normal((1, index.d), dtype=np.float32)
try:
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = ivf.nlist  # one full scan: every page of the index resident
except RuntimeError:
    pass
index.search(q, 5)
print("ready", flush=True)
sys.stdin.readline()
"""

MEMORY_RATIO_TARGET = 1.2  # issue 9: 2 replicas within 1.2x one copy


def processes_memory(path: Path, how: str, count: int) -> list[tuple[int, int]]:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", SERVICE_CHILD, str(path), how],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        for _ in range(count)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a child failed to load the index ({how})")
        return [memory_kib(child.pid) for child in children]
    finally:
        for child in children:
            if child.stdin:
                child.stdin.close()
            child.wait(timeout=120)


def service_index_file(n: int, folder: Path, seed: int) -> tuple[Path, str]:
    """The builder's on-disk format for n clustered vectors: IDMap2 around the chosen spec."""
    from image_search.faiss_index import write_index_file

    spec = choose_index_spec(n, DIM)
    started = time.perf_counter()
    vectors, _, _ = collection_and_queries(ClipLikeMixture(seed=seed), n, 1)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    inner = faiss.index_factory(DIM, spec.factory, faiss.METRIC_INNER_PRODUCT)
    if not inner.is_trained:
        ivf = faiss.extract_index_ivf(inner)
        ivf.cp.niter = 4  # see the module docstring: memory does not depend on the quantiser's quality
        rows = np.random.default_rng(seed).choice(n, min(n, 16 * ivf.nlist), replace=False)
        inner.train(vectors[np.sort(rows)])
    index = faiss.IndexIDMap2(inner)
    for start in range(0, n, CHUNK):
        index.add_with_ids(vectors[start : start + CHUNK], np.arange(start, min(n, start + CHUNK), dtype=np.int64))
    del vectors
    path = folder / "index.faiss"
    write_index_file(index, path)
    del index
    print(f"built and wrote {spec.factory} (IDMap2) of {n} x {DIM} in {time.perf_counter() - started:.0f}s", flush=True)
    return path, spec.factory


def memory_report(n: int, seed: int) -> int:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as folder:
        path, factory = service_index_file(n, Path(folder), seed)
        size_mib = os.path.getsize(path) / 2**20
        cases = [
            ("1 process, private copy (read_index_file)", "copy", 1),
            ("2 processes, private copies (read_index_file)", "copy", 2),
            ("2 processes, mapped (map_index_file = open_index)", "map", 2),
        ]
        rows, totals = [], {}
        for name, how, count in cases:
            measured = processes_memory(path, how, count)
            rss = " / ".join(f"{kib / 1024:.0f}" for kib, _ in measured)
            pss = " / ".join(f"{kib / 1024:.0f}" for _, kib in measured)
            totals[name] = sum(kib for _, kib in measured) / 1024
            rows.append([name, rss, pss, totals[name]])
            print(f"  {name}: PSS total {totals[name]:.0f} MiB", flush=True)
        one_copy = totals[cases[0][0]]
        for row in rows:
            row.append(row[3] / one_copy)
        print_table(
            f"Processes holding one {size_mib:.0f} MiB {factory} index (n={n}, after a full scan each)",
            ["load", "RSS MiB (each)", "PSS MiB (each)", "PSS MiB total", "x one copy"],
            rows,
        )
        verdict("2 mapped processes vs one copy (PSS)", totals[cases[2][0]] / one_copy, MEMORY_RATIO_TARGET, False, "x")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=ONE_MILLION, help="indexed vectors (default 1,000,000)")
    parser.add_argument("--queries", type=int, default=500, help="fresh queries, recall measured on all")
    parser.add_argument("--timed-queries", type=int, default=200, help="of those, timed one at a time")
    parser.add_argument("--tune-queries", type=int, default=500, help="held-out collection vectors for tuning")
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--types", default=",".join(TYPES), help=f"comma-separated subset of {','.join(TYPES)}")
    parser.add_argument("--nprobe", type=int, action="append", default=None, help="default 8, 16, 32, 64")
    parser.add_argument("--ef-search", type=int, action="append", default=None, help="default 16, 64, 256")
    parser.add_argument("--pq-m", type=int, default=DIM // 8, help="PQ bytes a vector for the ivf_pq type")
    parser.add_argument("--target", type=float, default=0.95, help="recall@10 the tuner aims for")
    parser.add_argument("--budget", type=int, default=DEFAULT_MAX_INDEX_MEMORY, help="planner budget, bytes")
    parser.add_argument("--memory-only", action="store_true", help="only PSS of mapped vs copied, service format")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.memory_only:
        print(f"search_at_scale --memory-only: {machine_note()}, n={args.n}, faiss {faiss.__version__}")
        return memory_report(args.n, args.seed)
    args.nprobe = args.nprobe or [8, 16, 32, 64]
    args.ef_search = args.ef_search or [16, 64, 256]
    types = [kind.strip() for kind in args.types.split(",") if kind.strip()]
    unknown = sorted(set(types) - set(TYPES))
    if unknown:
        parser.error(f"unknown --types {unknown}; choose from {TYPES}")
    try:
        chosen = choose_index_spec(args.n, DIM, max_memory_bytes=args.budget, recall_target=args.target)
        chosen_note = f"{chosen.factory} ({chosen.reason})"
    except IndexDoesNotFit as exc:
        chosen_note = f"none fits: {exc}"
    print(f"search_at_scale: {machine_note()}, n={args.n}, faiss {faiss.__version__}\nplanner's pick: {chosen_note}")

    phases: dict[str, tuple[float, float]] = {}
    started = time.perf_counter()
    mixture = ClipLikeMixture(dim=DIM, clusters=args.clusters, seed=args.seed)
    vectors, labels, queries = collection_and_queries(mixture, args.n, args.queries)
    cosines = np.percentile(cosine_to_topic_mean(vectors, labels), [5, 50, 95])
    shares = np.bincount(labels, minlength=args.clusters) / args.n
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    _, truth = faiss.knn(queries, vectors, K, metric=faiss.METRIC_INNER_PRODUCT)
    phases["data + exact"] = (0.0, time.perf_counter() - started)
    print(
        f"data: {args.n} x {DIM}, {args.clusters} Zipf topics (largest {shares.max():.1%} of the set), cosine to "
        f"topic mean p5/p50/p95 {cosines[0]:.2f}/{cosines[1]:.2f}/{cosines[2]:.2f}; "
        f"{args.queries} fresh queries; exact truth in {phases['data + exact'][1]:.0f}s",
        flush=True,
    )

    rows: list[Row] = []
    for kind, factory in factories(args.n, DIM, types, args.pq_m).items():
        print(f"[{kind}] {factory}", flush=True)
        started = time.perf_counter()
        measured, build_s = run_type(kind, factory, vectors, queries, truth, args)
        rows += measured
        phases[kind] = (build_s, time.perf_counter() - started - build_s)

    print_table(
        f"CLIP-like data, n={args.n:,}, d={DIM}, {args.queries} fresh queries, recall@10 vs exact, "
        "one thread, one query per call",
        ["index", "setting", "recall@10", "p50 ms", "p99 ms", "written MiB", "formula MiB", "build s"],
        [[r.index, r.setting, r.recall, r.p50_ms, r.p99_ms, r.written_mib, r.formula_mib, r.build_s] for r in rows],
    )
    for factory in {r.index for r in rows if "IVF" in r.index}:
        by_setting = {r.setting: r.recall for r in rows if r.index == factory}
        if "nprobe 8" in by_setting and "nprobe 64" in by_setting:
            low, high = by_setting["nprobe 8"], by_setting["nprobe 64"]
            print(f"{factory}: recall@10 nprobe 8 = {low:.3f}, nprobe 64 = {high:.3f}")
            verdict(f"{factory} recall gap nprobe 64 - nprobe 8", high - low, VISIBLY_DIFFERENT)
    for r in rows:
        if "(tuned" in r.setting:
            verdict(f"{r.index} {r.setting}: fresh-query recall@10", r.recall, args.target)
    planner_table(args.n)
    if args.n < ONE_MILLION:
        time_at_one_million(args.n, phases)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
