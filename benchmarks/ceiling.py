"""The compute ceiling: how many images/s the vision tower itself does on this machine.

Runs the ViT-B/32-sized random checkpoint in-process at batch 1/8/32, fp32 and bf16 autocast,
two ways each:

* raw:     `model(pixel_values=tensor).image_embeds` on a ready float tensor (the pure forward pass);
* encoder: `ClipImageEncoder.encode_pixels(uint8 crops)` (normalisation, forward, L2 norm, numpy).

The raw forward is the baseline and brackets each encoder measurement (benchmarks/bracket.py):
for every precision and batch, steady-state samples of the raw call right before and right after
the encoder's own samples, nothing else of ours running; the encoder's overhead is computed against
that bracket, and a bracket whose sides differ by more than 15% makes the verdict "too noisy, run
again". Every side's samples and spread are printed.

    .venv/bin/python -m benchmarks.ceiling [--quick] [--seconds S] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.bracket import MIN_SECONDS, Baseline, Bracket, bracketed_verdict, steady_samples
from benchmarks.common import machine_note, print_table, vit_b32_checkpoint
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


STATE = "no app, in-process"


@dataclass(frozen=True)
class Case:
    """One (precision, batch): the encoder's samples and the raw forward's bracket around them (img/s)."""

    encoder: Baseline
    raw: Bracket


def measure_case(encoder: ClipImageEncoder, pixels: np.ndarray, seconds: float) -> Case:
    """Raw forward samples, the encoder's samples, raw forward samples again (img/s, each at steady state)."""
    batch = len(pixels)
    raw = raw_forward(encoder, torch.from_numpy(normalize_batch(pixels, encoder.spec)))
    calls = max(1, IMAGES_PER_BLOCK // batch)

    def img_s(function: Callable[[], object]) -> float:
        return batch / measure_block(function, calls)

    before = steady_samples(lambda: img_s(raw), STATE, seconds)
    wrapped = steady_samples(lambda: img_s(lambda: encoder.encode_pixels(pixels)), STATE, seconds)
    after = steady_samples(lambda: img_s(raw), STATE, seconds)
    return Case(wrapped, Bracket(before, after))


def run_ceiling(
    seconds: float,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    precisions: tuple[Precision, ...] = PRECISIONS,
) -> dict[tuple[str, int], Case]:
    """For every (precision, batch): raw forward samples, encoder samples, raw forward samples again."""
    model_dir = str(vit_b32_checkpoint())
    encoders = {precision: ClipImageEncoder(model_dir, device="cpu", precision=precision) for precision in precisions}
    crops = random_crops(max(batch_sizes))
    cases: dict[tuple[str, int], Case] = {}
    for precision, encoder in encoders.items():
        for batch in batch_sizes:
            case = measure_case(encoder, crops[:batch], seconds)
            cases[(precision, batch)] = case
            print(f"{precision} batch {batch}: raw before {case.raw.before.describe()}", flush=True)
            print(f"{precision} batch {batch}: encoder    {case.encoder.describe()}", flush=True)
            print(f"{precision} batch {batch}: raw after  {case.raw.after.describe()}", flush=True)
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 s per sampled side instead of 8")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per sampled side, after warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    args = parser.parse_args(argv)
    seconds = args.seconds or (3.0 if args.quick else MIN_SECONDS)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"ceiling: {machine_note()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{seconds:g} s per side"
    )

    cases = run_ceiling(seconds)
    rows = []
    for precision in PRECISIONS:
        for batch in BATCH_SIZES:
            case = cases[(precision, batch)]
            raw, wrapped = case.raw.value, case.encoder.median
            rows.append(
                [
                    precision,
                    batch,
                    raw,
                    wrapped,
                    100 * case.raw.drift,
                    100 * max(case.raw.before.spread, case.raw.after.spread, case.encoder.spread),
                    1000 * batch / raw,
                    1000 * (1 / wrapped - 1 / raw),
                    raw / wrapped - 1,
                    raw / cases[("fp32", batch)].raw.value,
                ]
            )
    print_table(
        "Vision tower ceiling (medians of steady-state samples; raw = the bracket around the encoder's samples)",
        [
            "precision",
            "batch",
            "raw img/s",
            "encoder img/s",
            "bracket drift %",
            "worst spread %",
            "raw ms/batch",
            "encoder overhead ms/img",
            "encoder overhead",
            "speed vs fp32 raw",
        ],
        rows,
    )
    worst = max(case.raw.value / case.encoder.median - 1 for case in cases.values())
    bracketed_verdict(
        "worst encode_pixels overhead vs raw forward",
        worst,
        ENCODER_OVERHEAD_TARGET,
        [case.raw for case in cases.values()],
        higher_is_better=False,
    )
    print(f"fp32 batch-32 ceiling: {cases[('fp32', 32)].raw.value:.2f} img/s (the baseline of `served`)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
