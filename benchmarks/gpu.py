"""The encode path and the builder against the hardware's own bounds: `python -m benchmarks.gpu`.

Made for GPU machines, which are often bare images: it needs only torch, transformers, numpy,
pillow, faiss-cpu and pydantic (no Ray, no boto3; tests/test_gpu_benchmark.py imports and runs it
with both blocked). On a machine without CUDA it runs the same measurements at small sizes, so it
is tested here; the GPU figures come from running it on a GPU.

Measured, all in one run (ViT-B/32-sized random checkpoint, 640x480 photo-like JPEGs):

1. per precision (GPU: fp32, bf16, fp16; CPU: fp32, bf16) and batch (GPU: 32, 256, 1024 where
   memory allows; CPU: 8, 32): the raw forward pass on a ready tensor on the device (the bound),
   and `ClipImageEncoder.encode_pixels` (uint8 crops in host memory -> unit vectors in numpy), with
   the min cosine of each precision's vectors against fp32's;
2. preprocessing (read + decode + crop + hash, the builder's own `prepared_in_order`) on 1 core
   (in-process) and on all cores but one (the builder's process pool);
3. the builder's embedding loop (`embed_local`: pool + encoder at --batch-size, precision auto)
   and a full `python -m index_builder` build, against both bounds: the forward pass at that batch
   and precision, and the all-core preprocessing rate.

Every ratio is against a bracket (benchmarks/bracket.py): the bound sampled at steady state right
before and right after what it judges (the encode path's samples; the builder's two runs), with
nothing else of ours running; the samples and their spread are printed, and a bracket whose sides
differ by more than 15% turns the verdict into "too noisy, run again". `--baseline-seconds` and
`--rounds` (minimum samples) size each side.

    python -m benchmarks.gpu [--quick] [--images N] [--batch-size N] [--model DIR] [--device cuda|cpu]
                             [--baseline-seconds S] [--rounds N]
"""

from __future__ import annotations

import sys

# Only the standard library here: the builder's decoding processes import the main module when
# they start (multiprocessing's spawn/forkserver), and torch + transformers would cost each one
# seconds. The measurements live in benchmarks/gpu_measure.py.


def main(argv: list[str] | None = None) -> int:
    from benchmarks.gpu_measure import run

    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    raise SystemExit(main())
