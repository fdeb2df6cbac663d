"""The measurements of `python -m benchmarks.gpu` (see benchmarks/gpu.py for what and why).

Every ratio is against a bracket (benchmarks/bracket.py, standard library only: no Ray): the raw
forward sampled at steady state right before and right after the encode path's own samples; the
builder against both bounds, each sampled right before and right after the builder's runs.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from benchmarks.bracket import MIN_SECONDS, Baseline, Bracket, bracketed_verdict, steady_samples
from benchmarks.common import CACHE_DIR, machine_note, photo_jpeg, print_table, vit_b32_checkpoint
from image_search.encoder import ClipImageEncoder
from image_search.precision import ResolvedPrecision, host_cpu_flags, resolve_precision
from image_search.preprocessing import PreprocessSpec, normalize_batch
from image_search.storage import LocalStore
from index_builder.build import discover_images
from index_builder.local_engine import default_workers, embed_local, prepared_in_order

GPU_BATCHES = (32, 256, 1024)
CPU_BATCHES = (8, 32)
GPU_PRECISIONS: tuple[ResolvedPrecision, ...] = ("fp32", "bf16", "fp16")
CPU_PRECISIONS: tuple[ResolvedPrecision, ...] = ("fp32", "bf16")
ENCODE_TARGET_GPU = 0.9  # encode_pixels / raw forward at batch >= 32 in fp16/bf16 (issue 10)
ENCODE_TARGET_CPU = 0.95  # within 5% of the raw forward on CPU
BUILDER_TARGET = 0.8  # builder / min(forward, all-core preprocessing)
# Measured images per timing block, so small and large batches do comparable work.
GPU_IMAGES_PER_BLOCK = 4096
CPU_IMAGES_PER_BLOCK = 32


def _write_photo(path: Path, seed: int) -> None:
    if not path.is_file():
        path.write_bytes(photo_jpeg(seed))


def photo_folder(count: int, workers: int) -> Path:
    """`count` cached 640x480 photo-like JPEGs, written in parallel the first time (~50 ms each)."""
    folder = CACHE_DIR / f"photos-{count}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{seed:05d}.jpg" for seed in range(count)]
    missing = [(path, seed) for seed, path in enumerate(paths) if not path.is_file()]
    if missing:
        with ProcessPoolExecutor(max(1, workers)) as pool:
            list(pool.map(_write_photo, *zip(*missing, strict=True), chunksize=16))
    return folder


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The clock of the encoder table: wall time, or with --cpu-clock this process's CPU time, which
# other processes' load cannot inflate (with torch on one thread, no OpenMP spinning is counted).
CLOCK: list[Callable[[], float]] = [time.perf_counter]


def block_img_s(function: Callable[[], object], calls: int, batch: int, device: torch.device) -> float:
    """img/s of one timing block of `calls` calls on `batch` images (by CLOCK, device synchronised)."""
    synchronize(device)
    started = CLOCK[0]()
    for _ in range(calls):
        function()
    synchronize(device)
    return batch * calls / (CLOCK[0]() - started)


# What the encoder table's sides run beside: nothing else of ours (no app, no builder).
STATE = "no builder running, in-process"


def steady_img_s(
    function: Callable[[], object], calls: int, batch: int, device: torch.device, seconds: float, min_calls: int
) -> Baseline:
    return steady_samples(lambda: block_img_s(function, calls, batch, device), STATE, seconds, min_calls)


def raw_forward(encoder: ClipImageEncoder, pixels: np.ndarray) -> Callable[[], object]:
    """The bound: the transformers forward on a normalised tensor already on the device, in the encoder's precision."""
    dtype = torch.float16 if encoder.precision == "fp16" else torch.float32
    tensor = torch.from_numpy(normalize_batch(pixels, encoder.spec)).to(encoder.device, dtype)

    @torch.inference_mode()
    def run() -> object:
        with torch.autocast(encoder.device.type, dtype=torch.bfloat16, enabled=encoder.precision == "bf16"):
            return encoder.model(pixel_values=tensor).image_embeds

    return run


def encoder_rows(
    model: str,
    device: torch.device,
    precisions: tuple[ResolvedPrecision, ...],
    batches: tuple[int, ...],
    seconds: float,
    min_calls: int,
) -> tuple[list[list[object]], dict[tuple[str, int], Bracket]]:
    """Table rows (precision, batch, raw img/s, encode img/s, ratio, drift, spread, min cosine vs fp32),
    and the raw forward's bracket by key (the one behind each row's ratio)."""
    images_per_block = GPU_IMAGES_PER_BLOCK if device.type == "cuda" else CPU_IMAGES_PER_BLOCK
    crops = np.random.default_rng(0).integers(0, 256, (max(batches), 224, 224, 3), dtype=np.uint8)
    reference: dict[int, np.ndarray] = {}
    rows: list[list[object]] = []
    raw_brackets: dict[tuple[str, int], Bracket] = {}
    for precision in precisions:
        encoder = ClipImageEncoder(model, device=device.type, precision=precision)
        for batch in batches:
            pixels = crops[:batch]
            calls = max(1, images_per_block // batch)
            try:
                raw = raw_forward(encoder, pixels)
                before = steady_img_s(raw, calls, batch, device, seconds, min_calls)
                encode = functools.partial(encoder.encode_pixels, pixels)
                encoded = steady_img_s(encode, calls, batch, device, seconds, min_calls)
                after = steady_img_s(raw, calls, batch, device, seconds, min_calls)
                vectors = encoder.encode_pixels(pixels)
            except torch.cuda.OutOfMemoryError:
                rows.append([precision, batch, *([float("nan")] * 5), "out of memory"])
                torch.cuda.empty_cache()
                continue
            bracket = Bracket(before, after)
            if precision == "fp32":
                reference[batch] = vectors
            cosine = float(np.min(np.sum(vectors * reference[batch], axis=1))) if batch in reference else float("nan")
            raw_brackets[(precision, batch)] = bracket
            spread = max(before.spread, encoded.spread, after.spread)
            rows.append(
                [
                    precision,
                    batch,
                    bracket.value,
                    encoded.median,
                    encoded.median / bracket.value,
                    100 * bracket.drift,
                    100 * spread,
                    f"{cosine:.5f}",
                ]
            )
            for label, side in (("raw before", before), ("encode", encoded), ("raw after", after)):
                print(f"{precision} batch {batch}: {label} img/s {side.describe()}", flush=True)
        del encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, raw_brackets


def preprocessing_img_s(folder: Path, workers: int) -> float:
    """Read + decode + crop + hash of every image, through the builder's own pipeline (pool start included)."""
    store = LocalStore(folder)
    keys = [entry.key for entry in discover_images(store)]
    started = time.perf_counter()
    count = sum(1 for item in prepared_in_order(store, keys, PreprocessSpec(), workers, window=64 * max(1, workers)))
    return count / (time.perf_counter() - started)


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (the default without a GPU)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--images", type=int, default=None, help="JPEGs for preprocessing and builder (GPU 4096)")
    parser.add_argument("--batch-size", type=int, default=None, help="builder batch (GPU 256, CPU 32)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="min samples per bracket side (default 20; quick 3; each ~1 block)"
    )
    parser.add_argument(
        "--baseline-seconds", type=float, default=None, help="seconds per bracket side after warm-up (8; quick 2)"
    )
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the random ViT-B/32)")
    parser.add_argument(
        "--cpu-clock",
        action="store_true",
        help="CPU only: time the encoder table by process CPU time on one torch thread (for shared machines)",
    )
    args = parser.parse_args(argv)

    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.cpu_clock:
        if on_gpu:
            parser.error("--cpu-clock measures CPU runs only")
        torch.set_num_threads(1)
        CLOCK[0] = time.process_time
    device = torch.device("cuda" if on_gpu else "cpu")
    quick = args.quick or not on_gpu
    count = args.images or (64 if quick else 4096)
    batch_size = args.batch_size or (256 if on_gpu else 32)
    # A side stops at whichever comes first: `seconds` after its warm-up, or `min_calls` samples.
    min_calls = args.rounds or (3 if quick else 20)
    seconds = args.baseline_seconds or (2.0 if quick else MIN_SECONDS)
    workers = default_workers()
    precisions = GPU_PRECISIONS if on_gpu else CPU_PRECISIONS
    batches = GPU_BATCHES if on_gpu and not args.quick else CPU_BATCHES
    auto = resolve_precision("auto", device.type, host_cpu_flags())
    gpu_name = torch.cuda.get_device_name(device) if on_gpu else "no GPU"
    print(
        f"gpu: {machine_note()}, {gpu_name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{count} images, builder batch {batch_size}, auto = {auto}, bracket sides {seconds:g} s or "
        f"{min_calls} samples",
        flush=True,
    )
    started_all = time.perf_counter()
    folder = photo_folder(count, workers + 1)  # first: forks before torch has started any thread
    model = args.model or str(vit_b32_checkpoint())

    rows, raw_brackets = encoder_rows(model, device, precisions, batches, seconds, min_calls)
    print_table(
        f"Vision tower on {device.type} ({gpu_name}): raw forward on a ready device tensor vs encode_pixels "
        "(uint8 crops in, numpy out); medians of steady-state samples, raw = the bracket sampled right before "
        "and after the encode samples" + (", process CPU time on 1 thread" if args.cpu_clock else ""),
        [
            "precision",
            "batch",
            "raw img/s",
            "encode_pixels img/s",
            "encode / raw",
            "bracket drift %",
            "worst spread %",
            "min cosine vs fp32",
        ],
        rows,
    )

    one_core = preprocessing_img_s(folder, 0)
    encoder = ClipImageEncoder(model, device=device.type, precision="auto")
    if args.cpu_clock:  # the builder runs in wall time: its bounds must too, on all threads
        CLOCK[0] = time.perf_counter
        torch.set_num_threads(os.cpu_count() or 1)
    bound_pixels = np.random.default_rng(1).integers(0, 256, (batch_size, 224, 224, 3), dtype=np.uint8)
    bound_raw = raw_forward(encoder, bound_pixels)

    def bound_sides() -> tuple[Baseline, Baseline]:
        """Both bounds of the builder, now: the raw forward at its batch, and all-core preprocessing."""
        forward = steady_img_s(bound_raw, 1, batch_size, device, seconds, min_calls)
        # A pass over the whole folder is long and steady from its first call: few samples, short warm-up.
        preprocessing = steady_samples(
            lambda: preprocessing_img_s(folder, workers), STATE, seconds, 2, max_warmup_calls=1
        )
        print(f"bound: raw forward batch {batch_size} img/s {forward.describe()}", flush=True)
        print(f"bound: preprocessing, {workers} processes, img/s {preprocessing.describe()}", flush=True)
        return forward, preprocessing

    forward_before, preprocessing_before = bound_sides()
    all_cores = preprocessing_before.median
    print_table(
        f"Preprocessing, {count} x 640x480 JPEG (read + decode + crop + hash, the builder's pipeline)",
        ["workers", "img/s", "vs 1 core"],
        [["1 core (in-process)", one_core, 1.0], [f"{workers} processes", all_cores, all_cores / one_core]],
    )

    store = LocalStore(folder)
    keys = [entry.key for entry in discover_images(store)]
    started = time.perf_counter()
    records, _, _ = embed_local(store, keys, encoder.spec, encoder.encode_pixels, batch_size, workers)
    loop_img_s = len(records) / (time.perf_counter() - started)

    from index_builder.cli import main as build_main

    out = Path(tempfile.mkdtemp(prefix="gpu-build-", dir=CACHE_DIR))
    try:
        started = time.perf_counter()
        argv_build = ["--images", str(folder), "--out", str(out), "--model", model, "--quiet"]
        code = build_main([*argv_build, "--device", device.type, "--batch-size", str(batch_size)])
        build_img_s = count / (time.perf_counter() - started)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if code != 0:
        raise RuntimeError("the build failed")
    forward_after, preprocessing_after = bound_sides()
    del encoder
    forward_bracket = Bracket(forward_before, forward_after)
    preprocessing_bracket = Bracket(preprocessing_before, preprocessing_after)
    bound_forward, bound_pre = forward_bracket.value, preprocessing_bracket.value
    bound = min(bound_forward, bound_pre)
    print_table(
        f"Builder, {count} images, --batch-size {batch_size}, precision {auto}, {workers} decoding processes "
        "(bounds: brackets sampled right before and after the builder's runs)",
        ["what", "img/s", "vs forward bound", "vs preprocessing bound", "vs min bound", "bracket drift %"],
        [
            [
                "bound: raw forward at this batch",
                bound_forward,
                1.0,
                bound_forward / bound_pre,
                bound_forward / bound,
                100 * forward_bracket.drift,
            ],
            [
                "bound: preprocessing, all cores",
                bound_pre,
                bound_pre / bound_forward,
                1.0,
                bound_pre / bound,
                100 * preprocessing_bracket.drift,
            ],
            [
                "embed_local (pool + encoder)",
                loop_img_s,
                loop_img_s / bound_forward,
                loop_img_s / bound_pre,
                loop_img_s / bound,
                "",
            ],
            [
                "python -m index_builder (incl. model load, index, publish)",
                build_img_s,
                build_img_s / bound_forward,
                build_img_s / bound_pre,
                build_img_s / bound,
                "",
            ],
        ],
    )
    encode_target = ENCODE_TARGET_GPU if on_gpu else ENCODE_TARGET_CPU
    checked = [row for row in rows if row[-1] != "out of memory" and (not on_gpu or row[0] != "fp32")]
    if checked:
        worst = min(float(row[4]) for row in checked)  # type: ignore[arg-type]
        label = "fp16/bf16" if on_gpu else "fp32/bf16"
        bracketed_verdict(
            f"worst encode_pixels / raw forward ({label}, batch >= {min(batches)})",
            worst,
            encode_target,
            [raw_brackets[(str(row[0]), int(row[1]))] for row in checked],  # type: ignore[call-overload]
        )
    bracketed_verdict(
        "builder (embed_local) / min(forward, all-core preprocessing)",
        loop_img_s / bound,
        BUILDER_TARGET,
        [forward_bracket, preprocessing_bracket],
    )
    print(f"total {time.perf_counter() - started_all:.0f}s", flush=True)
    return 0
