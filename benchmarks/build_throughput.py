"""Index builder end to end (`index_builder.cli.main`, local engine) vs the forward-pass ceiling.

Writes ~200 photo-like 640x480 JPEGs once, then alternates, in this process: the batch-32 forward
pass of the same ViT-B/32-sized checkpoint in the build's precision (`--precision`, default auto:
bf16 on a CPU with native bf16, else fp32), the ceiling at the builder's batch size, and a full
build with `--batch-size 32` (discover, read, decode + crop in the worker processes, embed,
train/add, publish).

The ceiling brackets each build (benchmarks/bracket.py): steady-state samples of the forward pass
right before and right after it, in this process with no build running; each build's ratio is
against its own bracket, every side's samples and spread are printed, and a bracket whose sides
differ by more than 15% makes the verdict "too noisy, run again".

The build's wall time includes loading the model (~1-3 s), which the ceiling does not; the table
shows the ratio with and without it (model load timed separately in the same round).

    .venv/bin/python -m benchmarks.build_throughput [--quick] [--images N] [--rounds N] [--precision P]
                                                    [--baseline-seconds S]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.bracket import Baseline
    from image_search.encoder import ClipImageEncoder

# torch, transformers and the benchmark helpers are imported inside main(): the builder's decoding
# processes import this (main) module when they start, and must not pay for torch.

RATIO_TARGET = 0.9
BATCH = 32


BASELINE_STATE = "no build running, in-process"


def ceiling_side(encoder: ClipImageEncoder, seconds: float) -> Baseline:
    """One side of a build's bracket: img/s of the batch-32 forward pass, at steady state."""
    from benchmarks.bracket import steady_samples
    from benchmarks.common import forward_sampler

    sample = forward_sampler(encoder, BATCH)
    side = steady_samples(lambda: BATCH / sample(), BASELINE_STATE, seconds)
    print(f"ceiling ({BASELINE_STATE}): {encoder.precision} batch-{BATCH} img/s {side.describe()}", flush=True)
    return side


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="96 images, one round")
    parser.add_argument("--images", type=int, default=None, help="collection size (default 200)")
    parser.add_argument("--rounds", type=int, default=None, help="(ceiling, build) pairs (default 2)")
    parser.add_argument("--precision", default="auto", help="the build's --precision, and the ceiling's")
    parser.add_argument("--workers", default=None, help="the build's --workers (default: its own default)")
    parser.add_argument("--baseline-seconds", type=float, default=None, help="seconds per bracket side (default 8)")
    args = parser.parse_args(argv)
    import torch

    from benchmarks.bracket import MIN_SECONDS, Bracket, bracketed_verdict
    from benchmarks.common import CACHE_DIR, machine_note, median, print_table, vit_b32_checkpoint, write_photo_folder
    from image_search.encoder import ClipImageEncoder
    from index_builder.cli import main as build_main
    from index_builder.local_engine import default_workers

    count = args.images or (96 if args.quick else 200)
    rounds = args.rounds or (1 if args.quick else 2)
    print(
        f"build_throughput: {machine_note()}, {count} images, {rounds} rounds, torch {torch.get_num_threads()} threads"
    )

    model_dir = vit_b32_checkpoint()
    images = CACHE_DIR / f"photos-{count}"
    write_photo_folder(images, count)
    encoder = ClipImageEncoder(str(model_dir), device="cpu", precision=args.precision)
    workers = default_workers() if args.workers is None else int(args.workers)
    print(f"precision {encoder.precision}, {workers} decoding processes", flush=True)

    seconds = args.baseline_seconds or MIN_SECONDS
    rows = []
    ratios, ratios_steady = [], []
    brackets: list[Bracket] = []
    side = ceiling_side(encoder, seconds)
    for round_index in range(rounds):
        started = time.perf_counter()
        ClipImageEncoder(str(model_dir), device="cpu", precision=args.precision)
        load_s = time.perf_counter() - started
        out = Path(tempfile.mkdtemp(prefix="build-", dir=CACHE_DIR))
        try:
            started = time.perf_counter()
            argv_build = ["--images", str(images), "--out", str(out), "--model", str(model_dir)]
            options = ["--batch-size", str(BATCH), "--precision", args.precision, "--workers", str(workers)]
            code = build_main([*argv_build, *options, "--quiet"])
            build_s = time.perf_counter() - started
        finally:
            shutil.rmtree(out, ignore_errors=True)
        if code != 0:
            raise RuntimeError("the build failed")
        after = ceiling_side(encoder, seconds)
        brackets.append(Bracket(side, after))
        side = after
        ceiling = brackets[-1].value
        build_img_s = count / build_s
        steady_img_s = count / max(build_s - load_s, 1e-9)
        ratios.append(build_img_s / ceiling)
        ratios_steady.append(steady_img_s / ceiling)
        rows.append(
            [
                round_index + 1,
                ceiling,
                100 * brackets[-1].drift,
                build_s,
                load_s,
                build_img_s,
                steady_img_s,
                ratios[-1],
                ratios_steady[-1],
            ]
        )
    print_table(
        f"Index build, {count} x 640x480 JPEG, --batch-size {BATCH}, {encoder.precision}, local engine, "
        f"{workers} decoding processes",
        [
            "round",
            f"bracket img/s ({encoder.precision} b32)",
            "bracket drift %",
            "build s",
            "model load s",
            "build img/s",
            "build img/s excl. load",
            "vs ceiling",
            "vs ceiling excl. load",
        ],
        rows,
    )
    bracketed_verdict("build / ceiling (end to end)", median(ratios), RATIO_TARGET, brackets)
    bracketed_verdict("build / ceiling (excluding model load)", median(ratios_steady), RATIO_TARGET, brackets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
