"""The compute ceiling: how many images/s the vision tower itself does on this machine.

Runs the ViT-B/32-sized random checkpoint in-process at batch 1/8/32, fp32 and bf16 autocast,
two ways each:

* raw:     `model(pixel_values=tensor).image_embeds` on a ready float tensor (the pure forward pass);
* encoder: `ClipImageEncoder.encode_pixels(uint8 crops)` (normalisation, forward, L2 norm, numpy).

Both use the same module, and repetitions are interleaved round-robin, so the encoder's overhead
over the raw call is measured under the same background load.

    .venv/bin/python -m benchmarks.ceiling [--quick] [--rounds N] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.common import machine_note, median, print_table, verdict, vit_b32_checkpoint
from image_search.encoder import ClipImageEncoder
from image_search.precision import Precision
from image_search.preprocessing import normalize_batch

BATCH_SIZES = (1, 8, 32)
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")
# Images per measured block: small batches are repeated so each block does comparable work.
IMAGES_PER_BLOCK = 16
ENCODER_OVERHEAD_TARGET = 0.05  # encode_pixels may cost at most 5% more than the raw forward pass


def random_crops(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 224, 224, 3), dtype=np.uint8)


def raw_forward(encoder: ClipImageEncoder, tensor: torch.Tensor) -> Callable[[], object]:
    autocast_on = encoder.precision == "bf16"

    @torch.inference_mode()
    def run() -> object:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_on):
            return encoder.model(pixel_values=tensor).image_embeds

    return run


def measure_block(function: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - started) / calls


def run_ceiling(
    rounds: int,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    precisions: tuple[Precision, ...] = PRECISIONS,
) -> dict[tuple[str, int, str], list[float]]:
    """Seconds per call of every round for every (precision, batch, path); interleaved round-robin."""
    model_dir = str(vit_b32_checkpoint())
    encoders = {precision: ClipImageEncoder(model_dir, device="cpu", precision=precision) for precision in precisions}
    crops = random_crops(max(batch_sizes))
    cases: list[tuple[tuple[str, int, str], Callable[[], object], int]] = []
    for precision, encoder in encoders.items():
        for batch in batch_sizes:
            pixels = crops[:batch]
            tensor = torch.from_numpy(normalize_batch(pixels, encoder.spec))
            calls = max(1, IMAGES_PER_BLOCK // batch)
            cases.append(((precision, batch, "raw"), raw_forward(encoder, tensor), calls))
            cases.append(((precision, batch, "encoder"), lambda e=encoder, p=pixels: e.encode_pixels(p), calls))
    for _, function, _ in cases:  # warm-up: first calls allocate and pick kernels
        function()
    samples: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for round_index in range(rounds):
        order = cases if round_index % 2 == 0 else cases[::-1]
        for key, function, calls in order:
            samples[key].append(measure_block(function, calls))
        print(f"round {round_index + 1}/{rounds} done", flush=True)
    return dict(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 4")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 4)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"ceiling: {machine_note()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds")

    samples = run_ceiling(rounds)
    # Background load only ever adds time, so the fastest round estimates what the machine can do;
    # the median shows how much the load moved things. Ratios use the fastest rounds.
    best = {key: min(values) for key, values in samples.items()}
    typical = {key: median(values) for key, values in samples.items()}
    rows = []
    for precision in PRECISIONS:
        for batch in BATCH_SIZES:
            raw = best[(precision, batch, "raw")]
            wrapped = best[(precision, batch, "encoder")]
            rows.append(
                [
                    precision,
                    batch,
                    batch / raw,
                    batch / wrapped,
                    batch / typical[(precision, batch, "raw")],
                    1000 * raw,
                    1000 * (wrapped - raw) / batch,
                    wrapped / raw - 1,
                    best[("fp32", batch, "raw")] / raw,
                ]
            )
    print_table(
        f"Vision tower ceiling (fastest of {rounds} interleaved rounds; median raw img/s for the noise)",
        [
            "precision",
            "batch",
            "raw img/s",
            "encoder img/s",
            "raw img/s (median)",
            "raw ms/batch",
            "encoder overhead ms/img",
            "encoder overhead",
            "speed vs fp32 raw",
        ],
        rows,
    )
    worst = max(best[(p, b, "encoder")] / best[(p, b, "raw")] - 1 for p in PRECISIONS for b in BATCH_SIZES)
    verdict("worst encode_pixels overhead vs raw forward", worst, ENCODER_OVERHEAD_TARGET, higher_is_better=False)
    print(f"fp32 batch-32 ceiling: {32 / best[('fp32', 32, 'raw')]:.2f} img/s (the baseline of `served`)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
