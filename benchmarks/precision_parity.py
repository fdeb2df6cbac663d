"""bf16 vs fp32: do searches return the same top-5?

Embeds a database of photo-like images with fp32 (an exact Flat index, as below 100k), then a few
hundred different query images with fp32 and with bf16 autocast, and compares top-5 result sets:

* bf16 queries vs fp32 index   (serve with `precision: bf16` over an fp32-built index);
* bf16 queries vs bf16 index   (builder `--precision bf16` too);

against fp32 queries on the fp32 index. Also the cosine between each image's bf16 and fp32
vectors, and the median gap between the 5th and 6th fp32 scores: with a *random* checkpoint all
embeddings crowd together, the gaps are tiny and the overlap is pessimistic compared with a trained CLIP.

    .venv/bin/python -m benchmarks.precision_parity [--quick] [--database N] [--queries N]
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from benchmarks.common import machine_note, median, photo_jpeg, print_table, verdict, vit_b32_checkpoint
from image_search.encoder import ClipImageEncoder
from image_search.preprocessing import PreprocessSpec, pixels_from_bytes

K = 5
OVERLAP_TARGET = 0.95


def crops(start_seed: int, count: int, spec: PreprocessSpec) -> np.ndarray:
    return np.stack([pixels_from_bytes(photo_jpeg(seed), spec) for seed in range(start_seed, start_seed + count)])


def embed(encoder: ClipImageEncoder, pixels: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate(
        [encoder.encode_pixels(pixels[start : start + batch]) for start in range(0, len(pixels), batch)]
    )


def top_k(database: np.ndarray, queries: np.ndarray, k: int = K + 1) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(database)
    return index.search(queries, k)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / K for x, y in zip(a, b, strict=True)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 database images, 100 queries")
    parser.add_argument("--database", type=int, default=None, help="database images (default 400)")
    parser.add_argument("--queries", type=int, default=None, help="query images (default 200)")
    args = parser.parse_args(argv)
    database_count = args.database or (200 if args.quick else 400)
    query_count = args.queries or (100 if args.quick else 200)
    print(f"precision_parity: {machine_note()}, {database_count} database images, {query_count} queries")

    model_dir = str(vit_b32_checkpoint())
    fp32 = ClipImageEncoder(model_dir, device="cpu", precision="fp32")
    bf16 = ClipImageEncoder(model_dir, device="cpu", precision="bf16")
    started = time.perf_counter()
    database = crops(0, database_count, fp32.spec)
    queries = crops(100_000, query_count, fp32.spec)
    print(f"prepared {database_count + query_count} crops in {time.perf_counter() - started:.0f}s", flush=True)

    vectors = {}
    for name, encoder in (("fp32", fp32), ("bf16", bf16)):
        started = time.perf_counter()
        vectors[name] = (embed(encoder, database), embed(encoder, queries))
        print(f"embedded with {name} in {time.perf_counter() - started:.0f}s", flush=True)

    db32, q32 = vectors["fp32"]
    db16, q16 = vectors["bf16"]
    scores32, ids32 = top_k(db32, q32)
    _, ids_mixed = top_k(db32, q16)
    _, ids_bf16 = top_k(db16, q16)
    cosine = np.sum(q32 * q16, axis=1)
    gap = scores32[:, K - 1] - scores32[:, K]
    spread = 1 - float(np.median(db32 @ db32.mean(axis=0) / np.linalg.norm(db32.mean(axis=0))))
    rows = [
        ["bf16 queries, fp32 index", overlap(ids32[:, :K], ids_mixed[:, :K])],
        ["bf16 queries, bf16 index", overlap(ids32[:, :K], ids_bf16[:, :K])],
    ]
    print_table(
        f"Top-{K} overlap with fp32 queries on the fp32 index ({query_count} queries, {database_count} images)",
        ["setting", f"mean top-{K} overlap"],
        rows,
    )
    print(
        f"cosine(bf16, fp32) of the same query: median {median(cosine.tolist()):.5f}, min {cosine.min():.5f}; "
        f"fp32 score gap 5th-6th: median {median(gap.tolist()):.5f}; "
        f"median 1 - cos(vector, mean direction) = {spread:.4f} (how crowded the random model's embeddings are)"
    )
    for name, value in rows:
        verdict(f"{name}: top-{K} overlap", float(value), OVERLAP_TARGET)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
