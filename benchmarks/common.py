"""Shared helpers for the benchmarks: the ViT-B/32-sized checkpoint, photo-like JPEGs, timing, tables.

Numbers on a shared 2-core machine are noisy, so every benchmark reports ratios against a baseline
measured in the same process run, with repetitions interleaved where that makes sense.
"""

from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from image_search.encoder import ClipImageEncoder

from tests.support import VIT_B_32, make_clip_checkpoint, synthetic_image

CACHE_DIR = Path(os.environ.get("BENCH_CACHE_DIR", Path(tempfile.gettempdir()) / "image-search-bench"))
COCO_SIZE = (640, 480)


def vit_b32_checkpoint() -> Path:
    """A random CLIP with real ViT-B/32 sizes, made once and cached (about 600 MB on disk)."""
    # "-tok": with the fixture tokenizer (text search); a new folder, so caches made before it
    # (image tower only) are not rewritten under a benchmark that may be reading them.
    folder = CACHE_DIR / "clip-vit-b32-random-tok"
    needed = ("config.json", "preprocessor_config.json", "tokenizer.json")
    if not all((folder / name).is_file() for name in needed):
        folder.mkdir(parents=True, exist_ok=True)
        make_clip_checkpoint(folder, VIT_B_32)
    return folder


def photo_jpeg(seed: int, size: tuple[int, int] = COCO_SIZE, quality: int = 90) -> bytes:
    """A 640x480 JPEG with photo-like entropy (~100-200 KB, like COCO), not a flat synthetic drawing.

    The drawing from tests.support compresses to a few KB and decodes unrealistically fast, so
    sensor-like noise and fine texture are added before encoding.
    """
    rng = np.random.default_rng(seed)
    base = np.asarray(synthetic_image(seed, size), dtype=np.float32)
    height, width = base.shape[:2]
    texture = np.sin(np.arange(width, dtype=np.float32)[None, :, None] * rng.uniform(0.05, 0.5))
    texture = texture * np.cos(np.arange(height, dtype=np.float32)[:, None, None] * rng.uniform(0.05, 0.5))
    noisy = base + 18.0 * texture + rng.normal(0.0, 10.0, base.shape).astype(np.float32)
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_photo_folder(folder: Path, count: int, start_seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(start_seed, start_seed + count):
        path = folder / f"photo_{seed:05d}.jpg"
        if not path.is_file():
            path.write_bytes(photo_jpeg(seed))
        paths.append(path)
    return paths


def time_call(function: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call, `repeats` samples after `warmup` unmeasured calls."""
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return samples


def forward_seconds(encoder: ClipImageEncoder, batch: int, calls: int) -> float:
    """Median seconds of the plain transformers forward pass on `batch` random crops (after one warm-up), on CPU."""
    import torch

    from image_search.preprocessing import normalize_batch

    pixels = np.random.default_rng(batch).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    tensor = torch.from_numpy(normalize_batch(pixels, encoder.spec))
    # In the encoder's precision (bf16: autocast, as encode_pixels runs it).
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=encoder.precision == "bf16")
    samples = []
    with torch.inference_mode(), autocast:
        encoder.model(pixel_values=tensor)
        for _ in range(calls):
            started = time.perf_counter()
            encoder.model(pixel_values=tensor)
            samples.append(time.perf_counter() - started)
    return median(samples)


def forward_sampler(encoder: ClipImageEncoder, batch: int) -> Callable[[], float]:
    """A callable timing one plain forward pass on `batch` random crops, in seconds (a bracket's sample;
    the bracket's own warm-up replaces the one `forward_seconds` does per call)."""
    import torch

    from image_search.preprocessing import normalize_batch

    pixels = np.random.default_rng(batch).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    tensor = torch.from_numpy(normalize_batch(pixels, encoder.spec))

    def sample() -> float:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=encoder.precision == "bf16")
        with torch.inference_mode(), autocast:
            started = time.perf_counter()
            encoder.model(pixel_values=tensor)
            return time.perf_counter() - started

    return sample


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A GitHub-flavoured markdown table, so the output pastes straight into README.md."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            if value != value:  # NaN
                return "-"
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    cells = [[cell(value) for value in row] for row in rows]
    widths = [max(len(header), *(len(row[i]) for row in cells)) for i, header in enumerate(headers)]
    print(f"\n### {title}\n")
    print("| " + " | ".join(header.ljust(width) for header, width in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for row in cells:
        print("| " + " | ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)) + " |")
    print(flush=True)


def verdict(name: str, value: float, target: float, higher_is_better: bool = True, unit: str = "") -> str:
    ok = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    line = f"{'PASS' if ok else 'MISS'}  {name}: {value:.3f}{unit} (target {sign} {target:g}{unit})"
    print(line, flush=True)
    return line


def machine_note() -> str:
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} cores, load average {load:.2f} at start"
