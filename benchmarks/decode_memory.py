"""Peak memory of decoding one upload into the model's crop, per upload type: before vs now.

* before: the previous path (issue 21, item 12): convert to RGB at full size (16/32-bit and float
  images through a full-size float64 array, transparency composited on a full-size white canvas),
  then resize and crop;
* now:    `pixels_from_bytes`: resize the crop region in the decoded mode, convert only the crop.

Each (type, path) runs in a fresh child process: the peak resident memory (Linux VmHWM, reset with
/proc/self/clear_refs just before the call) minus the memory held before it. The upload types:
RGB JPEG (photo), RGBA PNG, 16-bit grey PNG, float32 TIFF, all `--megapixels` large.

    .venv/bin/python -m benchmarks.decode_memory [--megapixels 12]

One small run (`--megapixels 4`, 2 cores shared with other work; MiB above what was resident):

| upload     | KiB   | before MiB | now MiB | less  | max crop diff (levels) |
|------------|-------|------------|---------|-------|------------------------|
| RGB JPEG   | 98    | 0          | 0       | -     | 0                      |
| RGBA PNG   | 156   | 31         | 14      | 2.3x  | 1                      |
| 16-bit PNG | 789   | 114        | 8       | 14.6x | 1                      |
| float TIFF | 13214 | 124        | 15      | 8.1x  | 1                      |

The JPEG is decoded at 1/8 scale (DCT draft) either way. What remains for PNG/TIFF is the decoded
image itself (plus, for transparency, its premultiplied copy): that is what `max_request_pixels` and
`max_concurrent_decodes` bound per request and per Ingress replica.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import machine_note, print_table

STATUS = Path("/proc/self/status")
UPLOAD_TYPES = ("RGB JPEG", "RGBA PNG", "16-bit PNG", "float TIFF")


def make_upload(kind: str, megapixels: float) -> bytes:
    """A compressible image of `kind` (small bytes, many pixels: what makes uploads cheap to send)."""
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(width * 3 / 4)
    ramp = np.linspace(0, 1, width, dtype=np.float32)[None, :] * np.linspace(0.2, 1, height, dtype=np.float32)[:, None]
    out = io.BytesIO()
    if kind == "RGB JPEG":
        grey = (ramp * 255).astype(np.uint8)
        Image.fromarray(np.dstack([grey, grey[::-1], 255 - grey])).save(out, format="JPEG", quality=85)
    elif kind == "RGBA PNG":
        grey = (ramp * 255).astype(np.uint8)
        Image.fromarray(np.dstack([grey, grey, 255 - grey, grey])).save(out, format="PNG")
    elif kind == "16-bit PNG":
        Image.fromarray((ramp * 65535).astype(np.uint16)).save(out, format="PNG")
    elif kind == "float TIFF":
        Image.fromarray(ramp * 1000).save(out, format="TIFF", compression="tiff_deflate")
    else:
        raise ValueError(kind)
    return out.getvalue()


def _status_kib(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def before_pixels(data: bytes) -> np.ndarray:
    """The previous decode path, kept here as the baseline: full-size RGB first, then the crop."""
    from image_search.decoding import decode_upright
    from image_search.preprocessing import PreprocessSpec, prepare_pixels

    spec = PreprocessSpec()
    image = decode_upright(data, draft_size=spec.shortest_edge)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = float(array.max())
        top = 65535.0 if image.mode.startswith("I;16") or 255.0 < peak <= 65535.0 else max(peak, 255.0)
        image = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        image = background
    return prepare_pixels(image.convert("RGB"), spec)


def now_pixels(data: bytes) -> np.ndarray:
    from image_search.preprocessing import PreprocessSpec, pixels_from_bytes

    return pixels_from_bytes(data, PreprocessSpec())


def _measure(path: str, kind: str, megapixels: float, queue: multiprocessing.Queue) -> None:
    data = make_upload(kind, megapixels)
    run = before_pixels if path == "before" else now_pixels
    run(make_upload(kind, 0.01))  # imports and first-call setup outside the measurement
    STATUS.with_name("clear_refs").write_text("5")  # reset the peak (VmHWM) to what is resident now
    held = _status_kib("VmRSS")
    crop = run(data)
    peak = _status_kib("VmHWM")
    queue.put((len(data), (peak - held) / 1024, crop))


def measure(path: str, kind: str, megapixels: float) -> tuple[int, float, np.ndarray]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_measure, args=(path, kind, megapixels, queue))
    child.start()
    result = queue.get(timeout=600)
    child.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megapixels", type=float, default=12.0, help="pixels of each upload, in millions")
    args = parser.parse_args(argv)
    rows = []
    for kind in UPLOAD_TYPES:
        size, before_mib, before_crop = measure("before", kind, args.megapixels)
        _, now_mib, now_crop = measure("now", kind, args.megapixels)
        difference = int(np.abs(before_crop.astype(int) - now_crop.astype(int)).max())
        less = f"{before_mib / max(now_mib, 1):.1f}x" if before_mib >= 1 else "-"
        row = [kind, f"{size / 1024:.0f}", f"{before_mib:.0f}", f"{now_mib:.0f}", less, str(difference)]
        rows.append(row)
    title = f"Peak memory of one decode, {args.megapixels:g} MP uploads ({machine_note()})"
    print_table(title, ["upload", "KiB", "before MiB", "now MiB", "less", "max crop diff (levels)"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
