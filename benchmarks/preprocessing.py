"""Preprocessing cost per 640x480 JPEG: ours vs transformers' PIL-backend CLIP image processor.

* ours:               `pixels_from_bytes` (checked decode with JPEG draft scaling + box-resize crop) -> uint8;
* ours + normalize:   the same plus `normalize_batch` of that one crop (the float tensor the model takes);
* transformers (PIL): `Image.open(...).convert("RGB")` + `CLIPImageProcessorPil(images=...)` -> float array;
* PIL decode only:    the full-size decode alone, for reference.

Cases are interleaved round-robin over the same JPEG bytes. Also prints the largest difference
between our normalised tensor and the processor's (they should agree to within resampling noise).

    .venv/bin/python -m benchmarks.preprocessing [--quick] [--images N] [--rounds N]
"""

from __future__ import annotations

import argparse
import io
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from benchmarks.common import machine_note, median, photo_jpeg, print_table, verdict
from image_search.preprocessing import PreprocessSpec, normalize_batch, pixels_from_bytes
from tests.support import PREPROCESSOR_CONFIG

SPEEDUP_TARGET = 2.0


def make_cases(spec: PreprocessSpec, processor: CLIPImageProcessorPil) -> dict[str, Callable[[bytes], object]]:
    def ours(data: bytes) -> object:
        return pixels_from_bytes(data, spec)

    def ours_normalized(data: bytes) -> object:
        return normalize_batch(pixels_from_bytes(data, spec)[None], spec)

    def transformers_pil(data: bytes) -> object:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return processor(images=image, return_tensors="np")["pixel_values"]

    def decode_only(data: bytes) -> object:
        return Image.open(io.BytesIO(data)).convert("RGB")

    return {
        "ours (pixels_from_bytes)": ours,
        "ours + normalize_batch": ours_normalized,
        "transformers CLIPImageProcessorPil": transformers_pil,
        "PIL full decode only": decode_only,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds")
    parser.add_argument("--images", type=int, default=None, help="distinct JPEGs (default 40, quick 16)")
    parser.add_argument("--rounds", type=int, default=None, help="passes over the images (default 5, quick 3)")
    args = parser.parse_args(argv)
    count = args.images or (16 if args.quick else 40)
    rounds = args.rounds or (3 if args.quick else 5)
    print(f"preprocessing: {machine_note()}, {count} JPEGs x {rounds} rounds, single thread")

    spec = PreprocessSpec.from_dict(PREPROCESSOR_CONFIG)
    processor = CLIPImageProcessorPil(**PREPROCESSOR_CONFIG)
    jpegs = [photo_jpeg(seed) for seed in range(count)]
    cases = make_cases(spec, processor)
    for function in cases.values():  # warm-up
        function(jpegs[0])

    per_round: dict[str, list[float]] = defaultdict(list)
    names = list(cases)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            function = cases[name]
            started = time.perf_counter()
            for data in jpegs:
                function(data)
            per_round[name].append((time.perf_counter() - started) / count)

    ms = {name: 1000 * median(values) for name, values in per_round.items()}
    baseline = ms["transformers CLIPImageProcessorPil"]
    rows = [[name, value, 1000 / value, baseline / value] for name, value in ms.items()]
    print_table(
        f"Preprocessing, 640x480 JPEG (~{sum(map(len, jpegs)) // count // 1024} KB), median of rounds",
        ["path", "ms/image", "images/s", "speed vs transformers"],
        rows,
    )

    ours = np.concatenate([normalize_batch(pixels_from_bytes(data, spec)[None], spec) for data in jpegs[:8]])
    theirs = np.concatenate(
        [
            processor(images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="np")["pixel_values"]
            for data in jpegs[:8]
        ]
    )
    diff = np.abs(ours - theirs)
    print(
        f"parity vs transformers (8 images, normalised units): max |diff| {diff.max():.3f}, mean {diff.mean():.4f} "
        f"(1 uint8 level = {1 / 255 / min(spec.image_std):.4f}); the gap comes from JPEG draft (DCT-scaled) decoding"
    )
    verdict("ours vs transformers speed-up", baseline / ms["ours (pixels_from_bytes)"], SPEEDUP_TARGET, unit="x")
    with_normalize = baseline / ms["ours + normalize_batch"]
    verdict("ours + normalize vs transformers speed-up", with_normalize, SPEEDUP_TARGET, unit="x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
