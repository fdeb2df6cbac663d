"""The measurements of `python -m benchmarks.gpu` (see benchmarks/gpu.py for what and why)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import CACHE_DIR, machine_note, photo_jpeg, print_table, verdict, vit_b32_checkpoint
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


def seconds_per_call(function: Callable[[], object], calls: int, device: torch.device, rounds: int) -> float:
    """Fastest of `rounds` blocks of `calls` calls (background load only adds time), after a warm-up."""
    return paired_seconds([function], calls, device, rounds)[0]


def paired_seconds(functions: list[Callable[[], object]], calls: int, device: torch.device, rounds: int) -> list[float]:
    """Seconds per call of each function: blocks interleaved round-robin (same background load), fastest kept."""
    for function in functions:
        function()
    synchronize(device)
    best = [float("inf")] * len(functions)
    for _ in range(rounds):
        for position, function in enumerate(functions):
            started = CLOCK[0]()
            for _ in range(calls):
                function()
            synchronize(device)
            best[position] = min(best[position], (CLOCK[0]() - started) / calls)
    return best


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
    model: str, device: torch.device, precisions: tuple[ResolvedPrecision, ...], batches: tuple[int, ...], rounds: int
) -> tuple[list[list[object]], dict[tuple[str, int], float]]:
    """Table rows (precision, batch, raw img/s, encode img/s, ratio, min cosine vs fp32) and raw img/s by key."""
    images_per_block = GPU_IMAGES_PER_BLOCK if device.type == "cuda" else CPU_IMAGES_PER_BLOCK
    crops = np.random.default_rng(0).integers(0, 256, (max(batches), 224, 224, 3), dtype=np.uint8)
    reference: dict[int, np.ndarray] = {}
    rows: list[list[object]] = []
    raw_speed: dict[tuple[str, int], float] = {}
    for precision in precisions:
        encoder = ClipImageEncoder(model, device=device.type, precision=precision)
        for batch in batches:
            pixels = crops[:batch]
            calls = max(1, images_per_block // batch)
            try:
                raw_s, encode_s = paired_seconds(
                    [raw_forward(encoder, pixels), lambda e=encoder, p=pixels: e.encode_pixels(p)],
                    calls,
                    device,
                    rounds,
                )
                vectors = encoder.encode_pixels(pixels)
            except torch.cuda.OutOfMemoryError:
                rows.append([precision, batch, float("nan"), float("nan"), float("nan"), "out of memory"])
                torch.cuda.empty_cache()
                continue
            if precision == "fp32":
                reference[batch] = vectors
            cosine = float(np.min(np.sum(vectors * reference[batch], axis=1))) if batch in reference else float("nan")
            raw_speed[(precision, batch)] = batch / raw_s
            rows.append([precision, batch, batch / raw_s, batch / encode_s, raw_s / encode_s, f"{cosine:.5f}"])
            print(
                f"{precision} batch {batch}: raw {batch / raw_s:.1f} img/s, encode {batch / encode_s:.1f}", flush=True
            )
        del encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, raw_speed


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
    parser.add_argument("--rounds", type=int, default=None, help="timing blocks per measurement (GPU 3, CPU 2)")
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
    rounds = args.rounds or (2 if quick else 3)
    workers = default_workers()
    precisions = GPU_PRECISIONS if on_gpu else CPU_PRECISIONS
    batches = GPU_BATCHES if on_gpu and not args.quick else CPU_BATCHES
    auto = resolve_precision("auto", device.type, host_cpu_flags())
    gpu_name = torch.cuda.get_device_name(device) if on_gpu else "no GPU"
    print(
        f"gpu: {machine_note()}, {gpu_name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{count} images, builder batch {batch_size}, auto = {auto}",
        flush=True,
    )
    started_all = time.perf_counter()
    folder = photo_folder(count, workers + 1)  # first: forks before torch has started any thread
    model = args.model or str(vit_b32_checkpoint())

    rows, raw_speed = encoder_rows(model, device, precisions, batches, rounds)
    print_table(
        f"Vision tower on {device.type} ({gpu_name}): raw forward on a ready device tensor vs encode_pixels "
        f"(uint8 crops in, numpy out); fastest of {rounds} interleaved blocks"
        + (", process CPU time on 1 thread" if args.cpu_clock else ""),
        ["precision", "batch", "raw img/s", "encode_pixels img/s", "encode / raw", "min cosine vs fp32"],
        rows,
    )

    one_core = preprocessing_img_s(folder, 0)
    all_cores = preprocessing_img_s(folder, workers)
    print_table(
        f"Preprocessing, {count} x 640x480 JPEG (read + decode + crop + hash, the builder's pipeline)",
        ["workers", "img/s", "vs 1 core"],
        [["1 core (in-process)", one_core, 1.0], [f"{workers} processes", all_cores, all_cores / one_core]],
    )

    encoder = ClipImageEncoder(model, device=device.type, precision="auto")
    bound_forward = raw_speed.get((encoder.precision, batch_size))
    if args.cpu_clock:  # the builder runs in wall time: its bound must too, measured now, on all threads
        CLOCK[0] = time.perf_counter
        torch.set_num_threads(os.cpu_count() or 1)
        bound_forward = None
    if bound_forward is None:  # the builder's batch is not in the encoder table: measure it
        pixels = np.random.default_rng(1).integers(0, 256, (batch_size, 224, 224, 3), dtype=np.uint8)
        bound_forward = batch_size / seconds_per_call(raw_forward(encoder, pixels), 2, device, rounds)
    store = LocalStore(folder)
    keys = [entry.key for entry in discover_images(store)]
    started = time.perf_counter()
    records, _, _ = embed_local(store, keys, encoder.spec, encoder.encode_pixels, batch_size, workers)
    loop_img_s = len(records) / (time.perf_counter() - started)
    del encoder

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
    bound = min(bound_forward, all_cores)
    print_table(
        f"Builder, {count} images, --batch-size {batch_size}, precision {auto}, {workers} decoding processes",
        ["what", "img/s", "vs forward bound", "vs preprocessing bound", "vs min bound"],
        [
            ["bound: raw forward at this batch", bound_forward, 1.0, bound_forward / all_cores, bound_forward / bound],
            ["bound: preprocessing, all cores", all_cores, all_cores / bound_forward, 1.0, all_cores / bound],
            [
                "embed_local (pool + encoder)",
                loop_img_s,
                loop_img_s / bound_forward,
                loop_img_s / all_cores,
                loop_img_s / bound,
            ],
            [
                "python -m index_builder (incl. model load, index, publish)",
                build_img_s,
                build_img_s / bound_forward,
                build_img_s / all_cores,
                build_img_s / bound,
            ],
        ],
    )
    encode_target = ENCODE_TARGET_GPU if on_gpu else ENCODE_TARGET_CPU
    checked = [row for row in rows if row[5] != "out of memory" and (not on_gpu or row[0] != "fp32")]
    if checked:
        worst = min(float(row[4]) for row in checked)  # type: ignore[arg-type]
        label = "fp16/bf16" if on_gpu else "fp32/bf16"
        verdict(f"worst encode_pixels / raw forward ({label}, batch >= {min(batches)})", worst, encode_target)
    verdict("builder (embed_local) / min(forward, all-core preprocessing)", loop_img_s / bound, BUILDER_TARGET)
    print(f"total {time.perf_counter() - started_all:.0f}s", flush=True)
    return 0
