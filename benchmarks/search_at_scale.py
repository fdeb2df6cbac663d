"""FAISS at collection scale: exact flat search vs the index `choose_index_spec` picks (not part of CI).

Data: N x 512 unit vectors, either drawn around a few thousand cluster centres (CLIP-like: each
vector has cosine ~0.7 to its centre) or uniformly random on the sphere (the worst case for IVF).
Queries are fresh draws from the same distribution. Ground truth is the exact inner-product top-k.

Per index: recall@5 vs exact, p50/p95 latency of one query at a time on one thread (how the Searcher
deployment runs: `num_threads: 1`, one request per call), speed-up vs exact flat, index bytes, and
build time. An nprobe sweep (free: same index) and optional other nlist / HNSW32 show what to pick.

The IVF coarse quantiser is trained on a sample of `--train-per-list` points per list, by default
the builder's own `TRAINING_POINTS_PER_LIST` (FAISS would otherwise use up to 256 per list, i.e. all
1M vectors: ~20+ minutes of k-means on 2 cores).

Memory with 2 Searcher replicas: `--mmap` writes the index to a local file and starts two processes
that load it at the same time, with and without `faiss.IO_FLAG_MMAP`, and reports their RSS and PSS
(PSS splits shared pages between the processes that map them, so it shows real sharing).

`--memory-only` measures just that, the way the service loads an index: the builder's format (an
IDMap2 around the chosen index, `write_index_file`) opened with `map_index_file` (what `open_index`
does) in 2 processes, against `read_index_file` (a private copy) in 1 and in 2 processes. Each
process scans every inverted list once (nprobe = nlist) so every page of the index is resident: the
worst case for the mapped processes. To keep it to minutes on small machines, the IVF quantiser is
trained with few k-means iterations: search quality is not measured here, memory does not depend on it.

    .venv/bin/python -m benchmarks.search_at_scale [--quick | --n N] [--data clustered|random|both]
        [--nlist 4096 --nlist 8192 ...] [--nprobe 16 --nprobe 32 ...] [--hnsw] [--mmap]
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

from benchmarks.common import machine_note, percentile, print_table, verdict
from image_search.faiss_index import apply_search_params
from image_search.index_spec import TRAINING_POINTS_PER_LIST, choose_index_spec

DIM = 512
K = 5
RECALL_TARGET = 0.95
SPEEDUP_TARGET = 20.0
CHUNK = 100_000


def normalized(array: np.ndarray) -> np.ndarray:
    array /= np.linalg.norm(array, axis=1, keepdims=True)
    return array


def make_vectors(kind: str, n: int, queries: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(database, queries), float32 unit vectors, generated in chunks to bound temporaries."""
    rng = np.random.default_rng(seed)
    centres = normalized(rng.standard_normal((clusters, DIM), dtype=np.float32))
    # Per-dimension noise so that a member's cosine to its centre is ~0.7 (1 / sqrt(1 + DIM * s^2)).
    spread = np.float32(np.sqrt((1 / 0.7**2 - 1) / DIM))

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, DIM), dtype=np.float32)
        for start in range(0, count, CHUNK):
            size = min(CHUNK, count - start)
            block = rng.standard_normal((size, DIM), dtype=np.float32)
            if kind == "clustered":
                block *= spread
                block += centres[rng.integers(0, clusters, size)]
            out[start : start + size] = normalized(block)
        return out

    return draw(n), draw(queries)


@dataclass
class Measured:
    name: str
    recall: float
    p50_ms: float
    p95_ms: float
    index_bytes: int
    build_s: float


def single_query_latencies(index: faiss.Index, queries: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """One query per call on one thread, as the Searcher runs; returns ids and per-query seconds."""
    ids = np.empty((len(queries), K), dtype=np.int64)
    seconds = []
    for row in range(len(queries)):
        started = time.perf_counter()
        _, found = index.search(queries[row : row + 1], K)
        seconds.append(time.perf_counter() - started)
        ids[row] = found[0]
    return ids, seconds


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(
        len(set(row_found.tolist()) & set(row_truth.tolist()))
        for row_found, row_truth in zip(found, truth, strict=True)
    )
    return hits / truth.size


def index_bytes(index: faiss.Index) -> int:
    with tempfile.NamedTemporaryFile(dir=os.environ.get("BENCH_TMP")) as handle:
        faiss.write_index(index, handle.name)
        return os.path.getsize(handle.name)


def build(factory: str, vectors: np.ndarray, train_per_list: int, seed: int) -> tuple[faiss.Index, float]:
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        nlist = faiss.extract_index_ivf(index).nlist
        sample = min(len(vectors), nlist * train_per_list)
        rows = np.sort(np.random.default_rng(seed).choice(len(vectors), sample, replace=False))
        index.train(vectors[rows])
    for start in range(0, len(vectors), CHUNK):
        index.add(vectors[start : start + CHUNK])
    return index, time.perf_counter() - started


def evaluate(
    name: str, index: faiss.Index, queries: np.ndarray, truth: np.ndarray, exact_p50: float, build_s: float, size: int
) -> Measured:
    faiss.omp_set_num_threads(1)
    found, seconds = single_query_latencies(index, queries)
    return Measured(
        name, recall_at_k(found, truth), 1000 * percentile(seconds, 50), 1000 * percentile(seconds, 95), size, build_s
    )


def run_data(kind: str, args: argparse.Namespace) -> list[tuple[Measured, float]]:
    started = time.perf_counter()
    vectors, queries = make_vectors(kind, args.n, args.queries, args.clusters, args.seed)
    print(f"[{kind}] generated {args.n} x {DIM} in {time.perf_counter() - started:.0f}s", flush=True)

    exact = faiss.IndexFlatIP(DIM)
    exact.add(vectors)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    _, truth = exact.search(queries, K)  # batched: BLAS, all cores
    faiss.omp_set_num_threads(1)
    exact_rows = queries[: args.exact_queries]
    _, exact_seconds = single_query_latencies(exact, exact_rows)
    exact_p50 = 1000 * percentile(exact_seconds, 50)
    results = [
        (Measured("Flat (exact)", 1.0, exact_p50, 1000 * percentile(exact_seconds, 95), DIM * 4 * args.n, 0), 1.0)
    ]
    del exact
    print(f"[{kind}] exact single-query p50 {exact_p50:.1f} ms", flush=True)

    chosen = choose_index_spec(args.n, DIM)
    factories = [chosen.factory] + [f"IVF{nlist},Flat" for nlist in args.nlist if f"IVF{nlist},Flat" != chosen.factory]
    if args.hnsw:
        factories.append("HNSW32,Flat")
    for factory in factories:
        index, build_s = build(factory, vectors, args.train_per_list, args.seed)
        size = index_bytes(index)
        print(f"[{kind}] built {factory} in {build_s:.0f}s, {size / 2**20:.0f} MiB", flush=True)
        if factory.startswith("IVF"):
            chosen_nprobe = chosen.params.get("nprobe") if factory == chosen.factory else None
            for nprobe in sorted({*args.nprobe, *([chosen_nprobe] if chosen_nprobe else [])}):
                apply_search_params(index, {"nprobe": nprobe})
                tag = " (chosen)" if nprobe == chosen_nprobe else ""
                measured = evaluate(f"{factory} nprobe {nprobe}{tag}", index, queries, truth, exact_p50, build_s, size)
                results.append((measured, exact_p50 / measured.p50_ms))
                print(
                    f"[{kind}]   {measured.name}: recall {measured.recall:.3f} p50 {measured.p50_ms:.2f} ms", flush=True
                )
        else:
            for ef in args.ef_search:
                apply_search_params(index, {"ef_search": ef})
                measured = evaluate(f"{factory} efSearch {ef}", index, queries, truth, exact_p50, build_s, size)
                results.append((measured, exact_p50 / measured.p50_ms))
                print(
                    f"[{kind}]   {measured.name}: recall {measured.recall:.3f} p50 {measured.p50_ms:.2f} ms", flush=True
                )
        if args.mmap and factory == chosen.factory and kind == args.data_kinds[0]:
            mmap_report(index)
        del index
    return results


# --- shared memory of two Searcher-like processes ----------------------------------------------

CHILD = """
import sys, time, faiss, numpy as np
path, flag = sys.argv[1], int(sys.argv[2])
index = faiss.read_index(path, flag)
faiss.extract_index_ivf(index).nprobe = 32
q = np.random.default_rng(0).standard_normal((200, index.d), dtype=np.float32)
q /= np.linalg.norm(q, axis=1, keepdims=True)
faiss.omp_set_num_threads(1)
for row in range(len(q)):
    index.search(q[row:row + 1], 5)
print("ready", flush=True)
sys.stdin.readline()
"""


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB from /proc/PID/smaps_rollup."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in ("Rss:", "Pss:"):
            values[parts[0]] = int(parts[1])
    return values["Rss:"], values["Pss:"]


def two_processes(path: str, flag: int) -> list[tuple[int, int]]:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, path, str(flag)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"child failed to load the index (flag {flag})")
        return [memory_kib(child.pid) for child in children]
    finally:
        for child in children:
            if child.stdin:
                child.stdin.close()
            child.wait(timeout=60)


def mmap_report(index: faiss.Index) -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as folder:
        path = str(Path(folder) / "index.faiss")
        faiss.write_index(index, path)
        size_mib = os.path.getsize(path) / 2**20
        rows = []
        for name, flag in (("read_index (copy)", 0), ("read_index IO_FLAG_MMAP", faiss.IO_FLAG_MMAP)):
            try:
                measured = two_processes(path, flag)
            except RuntimeError as exc:
                rows.append([name, "-", "-", "-", str(exc)])
                continue
            rss = [kib / 1024 for kib, _ in measured]
            pss = [kib / 1024 for _, kib in measured]
            rows.append([name, f"{rss[0]:.0f} / {rss[1]:.0f}", f"{pss[0]:.0f} / {pss[1]:.0f}", sum(pss), ""])
        print_table(
            f"Two processes holding the same {size_mib:.0f} MiB index (after 200 searches each)",
            ["load", "RSS MiB (each)", "PSS MiB (each)", "PSS MiB total", "note"],
            rows,
        )


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
    vectors, _ = make_vectors("clustered", n, 1, 3000, seed)
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
    parser.add_argument("--n", type=int, default=None, help="database vectors (default 1,000,000; quick 200,000)")
    parser.add_argument("--quick", action="store_true", help="200k vectors, clustered data only, no extra nlist")
    parser.add_argument("--data", choices=("clustered", "random", "both"), default=None)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--exact-queries", type=int, default=30, help="single-query timings of the exact scan")
    parser.add_argument("--clusters", type=int, default=3000)
    parser.add_argument("--nlist", type=int, action="append", default=None, help="extra IVF list counts to try")
    parser.add_argument("--nprobe", type=int, action="append", default=None, help="nprobe values to sweep")
    parser.add_argument("--hnsw", action="store_true", help="also build HNSW32 (slow to build on 2 cores)")
    parser.add_argument("--ef-search", type=int, action="append", default=None)
    parser.add_argument("--train-per-list", type=int, default=TRAINING_POINTS_PER_LIST)
    parser.add_argument("--mmap", action="store_true", help="measure RSS/PSS of 2 processes with and without mmap")
    parser.add_argument("--memory-only", action="store_true", help="only PSS of mapped vs copied, service format")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.n = args.n or (200_000 if args.quick else 1_000_000)
    if args.memory_only:
        print(f"search_at_scale --memory-only: {machine_note()}, n={args.n}, faiss {faiss.__version__}")
        return memory_report(args.n, args.seed)
    args.data = args.data or ("clustered" if args.quick else "both")
    args.data_kinds = ["clustered", "random"] if args.data == "both" else [args.data]
    args.nlist = args.nlist or []
    args.nprobe = args.nprobe or [8, 16, 32, 64]
    args.ef_search = args.ef_search or [32, 64, 128]
    chosen = choose_index_spec(args.n, DIM)
    print(
        f"search_at_scale: {machine_note()}, n={args.n}, "
        f"chosen {chosen.factory} {chosen.params}, faiss {faiss.__version__}"
    )

    summary: dict[str, list[tuple[Measured, float]]] = {}
    for kind in args.data_kinds:
        summary[kind] = run_data(kind, args)
        print_table(
            f"{kind} data, n={args.n}, {args.queries} queries, k={K}, one thread, one query per call",
            ["index", "recall@5", "p50 ms", "p95 ms", "speed-up vs exact (p50)", "index MiB", "build s"],
            [
                [m.name, m.recall, m.p50_ms, m.p95_ms, speedup, m.index_bytes / 2**20, m.build_s]
                for m, speedup in summary[kind]
            ],
        )
    for kind, results in summary.items():
        for measured, speedup in results:
            if measured.name.endswith("(chosen)"):
                verdict(f"[{kind}] chosen recall@5", measured.recall, RECALL_TARGET)
                verdict(f"[{kind}] chosen speed-up", speedup, SPEEDUP_TARGET, unit="x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
