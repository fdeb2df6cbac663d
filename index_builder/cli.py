"""`python -m index_builder --images SRC --out DST [--model ID_OR_DIR] [--full] [--compact] [--engine local|ray] ...`.

Incremental by default: only images that are new or whose bytes changed since the published
version are embedded (see index_builder.build).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

from image_search.artifact import DEFAULT_KEEP_VERSIONS, DEFAULT_RETENTION_S
from image_search.checkpoints import DEFAULT_MODEL
from image_search.commit_lock import LockBusy, commit_lock, holder_name
from image_search.index_planner import DEFAULT_MAX_INDEX_MEMORY, parse_byte_size
from image_search.precision import PRECISIONS
from image_search.storage import StoreError, is_s3_uri, open_store
from index_builder.build import BuildError, BuildReport, ModelInfo, finish_build, open_collection
from index_builder.diff import DEFAULT_MAX_REMOVED_SHARE
from index_builder.options import plan_from_args

INTERRUPTED_EXIT_CODE = 130  # what shells report for a SIGINT


def byte_size(text: str) -> int:
    """argparse type of --max-index-memory: bytes, or a number with a unit (image_search/index_planner.py)."""
    try:
        return parse_byte_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m index_builder", description=__doc__)
    parser.add_argument("--images", required=True, help="folder or s3://bucket/prefix of images (walked recursively)")
    parser.add_argument("--out", required=True, help="folder or s3://bucket/prefix to publish the index to")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="CLIP hub id or local checkpoint folder")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--engine", choices=("local", "ray"), default="local", help="local threads or Ray Data")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto (default): fp16 on a GPU, bf16 on a CPU with native bf16, fp32 otherwise",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decoding processes (local engine; default: all cores but one; 0: decode in the main process)",
    )
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (ray engine); default: local")
    parser.add_argument("--actors", type=int, default=1, help="encoder actors (ray engine)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--full", action="store_true", help="embed every image again (default: only what changed)")
    parser.add_argument("--compact", action="store_true", help="merge every segment into one after publishing")
    parser.add_argument(
        "--max-index-memory",
        type=byte_size,
        default=DEFAULT_MAX_INDEX_MEMORY,
        help="memory budget of each segment's FAISS index, e.g. 512MiB or 16GiB (default 4GiB): the planner "
        "picks the least lossy index type that fits (Flat, IVF-Flat, IVF-SQ8, HNSW, (OPQ) IVF-PQ)",
    )
    parser.add_argument(
        "--retention-hours",
        type=float,
        default=DEFAULT_RETENTION_S / 3600,
        help="keep versions that stopped being current less than this long ago (default 24)",
    )
    parser.add_argument(
        "--keep-versions",
        type=int,
        default=DEFAULT_KEEP_VERSIONS,
        help=f"keep at least this many newest versions (default {DEFAULT_KEEP_VERSIONS}, minimum 2)",
    )
    parser.add_argument(
        "--lock-wait-s",
        type=float,
        default=0.0,
        help="wait this long for the index's commit lock when another builder or the service's Writer "
        "holds it (default 0: fail at once, naming the holder)",
    )
    parser.add_argument(
        "--max-removed-share",
        type=float,
        default=DEFAULT_MAX_REMOVED_SHARE,
        help="refuse to publish a build that removes more than this share of the published images "
        f"(default {DEFAULT_MAX_REMOVED_SHARE:g}): an unmounted disk or a wrong --images looks like that",
    )
    parser.add_argument(
        "--allow-mass-removal", action="store_true", help="publish even if more than --max-removed-share is removed"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.max_removed_share <= 1:
        parser.error("--max-removed-share must be between 0 and 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be >= 0")
    if args.retention_hours < 0:
        parser.error("--retention-hours must be >= 0")
    if args.keep_versions < 2:
        parser.error("--keep-versions must be >= 2 (CURRENT and the version before it are always kept)")
    return args


def run_local(args: argparse.Namespace, before_commit: Callable[[], None] | None = None) -> BuildReport:
    from tqdm import tqdm

    from image_search.encoder import ClipImageEncoder, ModelLoadError
    from index_builder.local_engine import default_workers, embed_local, start_workers_early

    started = time.perf_counter()
    collection = open_collection(args.images, args.out)
    workers = default_workers() if args.workers is None else args.workers
    if workers:
        start_workers_early()  # the decoding pool's server starts while the model loads
    try:
        encoder = ClipImageEncoder(args.model, device=args.device, precision=args.precision)
    except (ModelLoadError, ValueError) as exc:
        raise BuildError(str(exc)) from exc
    print(f"encoding on {encoder.device.type} in {encoder.precision}, {workers} decoding processes")
    model = ModelInfo(
        name=args.model,
        fingerprint=encoder.identity.fingerprint,
        embedding_dim=encoder.embedding_dim,
        preprocessing=encoder.spec.to_dict(),
        precision=encoder.precision,  # what runs: "auto" resolved
    )
    plan = plan_from_args(collection, model, args, before_commit)
    keys = list(plan.diff.to_embed)
    # Nothing to embed: no progress bar (an empty one reads like a stall).
    with tqdm(total=len(keys), unit="img", disable=args.quiet or not keys, file=sys.stderr) as progress:
        records, vectors, skipped = embed_local(
            collection.source, keys, encoder.spec, encoder.encode_pixels, args.batch_size, workers, progress.update
        )
    return finish_build(plan, records, vectors, sorted([*collection.skipped, *skipped]), started)


def check_source(location: str) -> None:
    if not is_s3_uri(location):
        from pathlib import Path

        if not Path(location).is_dir():
            raise BuildError(f"--images {location}: no such folder")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_source(args.images)
        # One writer per index: planning, ids and CURRENT are this build's alone until it is done
        # (the service's Writer takes the same lock for each commit).
        # lease.check before each CURRENT write: a lease lost to another writer (S3 refreshes that
        # failed for longer than the lease) refuses the publish instead of racing that writer.
        with commit_lock(open_store(args.out), holder_name("index_builder"), wait_s=args.lock_wait_s) as lease:
            if args.engine == "ray":
                from index_builder.ray_engine import run_ray

                report = run_ray(args, lease.check)
            else:
                report = run_local(args, lease.check)
    except (BuildError, StoreError, LockBusy) as exc:
        print(f"index_builder: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Before CURRENT is written nothing a reader sees has changed; publish() finishes on its own after.
        # An interrupted progress bar leaves its line open: start ours on a fresh one.
        start = "" if args.quiet else "\n"
        print(f"{start}index_builder: interrupted; the published index is unchanged", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    for path, reason in report.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(summary_line(report))
    if report.version is None:
        print(
            f"nothing changed: {report.count} images, {args.out} still serves version {report.previous_version} "
            "(no new version published)"
        )
        return 0
    if report.compacted is not None:
        print(f"compacted into {report.segments} segment(s): version {report.compacted}")
    spec = report.index.factory if report.index else "?"
    print(
        f"indexed {report.count} images ({len(report.skipped)} skipped) into {args.out} "
        f"version {report.version}, index {spec}, in {report.seconds:.1f}s{embedding_rate(report)}"
    )
    return 0


def summary_line(report: BuildReport) -> str:
    return (
        f"added {report.added}, changed {report.changed}, removed {report.removed}, moved {report.moved}, "
        f"reused {report.reused} in {report.seconds:.1f}s"
    )


def embedding_rate(report: BuildReport) -> str:
    """ " (E embedded, R images/s)" over the images this build embedded; nothing when it embedded none
    (a rate over reused images would only measure the listing)."""
    embedded = report.added + report.changed
    if embedded == 0 or report.seconds <= 0:
        return ""
    return f" ({embedded} embedded, {embedded / report.seconds:.1f} images/s)"
