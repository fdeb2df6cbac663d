"""Where the Ingress's CPU per /search request goes, step by step, in-process (no Ray, no HTTP).

`benchmarks.served` measures the Ingress's whole CPU per request from /proc (~15 ms on a 2-core VM,
issue 10). This times the Ingress's own steps on the same 640x480 photo-like JPEG, one request at a
time, so the rest (Starlette/uvicorn in the proxy and the replica, Ray handle calls) is the
difference between the two:

* multipart: `serve_app.multipart.read_form` over the body in 64 KiB chunks (what the ASGI
  receive loop hands over);
* decode + crop: `pixels_from_bytes` (Pillow, DCT-draft JPEG decode);
* handle payloads: pickling the 224x224x3 uint8 crop for the Embedder call (Ray serialises
  arguments with pickle protocol 5) and the (1, 512) float32 vector for the Searcher call;
* JSON: `JSONResponse` of a 5-match result.

    python -m benchmarks.ingress_cpu [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import time
from collections.abc import AsyncIterator, Callable

import numpy as np

from benchmarks.common import machine_note, photo_jpeg, print_table

CHUNK = 64 * 1024
BOUNDARY = "----benchmarkboundary7MA4YWxkTrZu0gW"


def multipart_body(jpeg: bytes) -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="q.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + jpeg + f"\r\n--{BOUNDARY}--\r\n".encode()


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), CHUNK):
        yield body[start : start + CHUNK]


def cpu_ms(function: Callable[[], object], repeats: int) -> float:
    """Median process CPU milliseconds per call (CPU time, not wall time: the machine may be busy)."""
    function()
    samples = []
    for _ in range(repeats):
        started = time.process_time()
        function()
        samples.append(time.process_time() - started)
    return 1000 * float(np.median(samples))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args(argv)
    from starlette.responses import JSONResponse

    from image_search.preprocessing import PreprocessSpec, pixels_from_bytes
    from serve_app.config import UploadLimits
    from serve_app.multipart import read_form

    print(f"ingress_cpu: {machine_note()}, {args.requests} requests per step")
    jpeg = photo_jpeg(1)
    body = multipart_body(jpeg)
    limits = UploadLimits()
    spec = PreprocessSpec()
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    loop = asyncio.new_event_loop()
    crop = pixels_from_bytes(jpeg, spec)
    vector = np.random.default_rng(0).normal(size=(1, 512)).astype(np.float32)
    results = {
        "results": [
            {
                "filename": "q.jpg",
                "matches": [
                    {"id": i, "path": f"photos/p{i}.jpg", "url": f"/images/{i}", "thumbnail_url": "x", "score": 0.5}
                    for i in range(5)
                ],
            }
        ]
    }

    def multipart() -> object:
        return loop.run_until_complete(read_form(content_type, str(len(body)), _chunks(body), limits))

    upload = multipart()[0][0]  # type: ignore[index]
    steps = [
        (f"multipart ({len(body) // 1024} KiB body)", multipart),
        ("decode + crop (pixels_from_bytes)", lambda: pixels_from_bytes(bytes(upload.data), spec, "q.jpg")),
        ("pickle crop for the Embedder call", lambda: pickle.loads(pickle.dumps(crop, protocol=5))),
        ("pickle vector for the Searcher call", lambda: pickle.loads(pickle.dumps(vector, protocol=5))),
        ("JSONResponse of 5 matches", lambda: JSONResponse(results).body),
    ]
    rows = []
    total = 0.0
    for name, function in steps:
        ms = cpu_ms(function, args.requests)
        total += ms
        rows.append([name, ms])
    rows.append(["sum of the Ingress's own steps", total])
    print_table("Ingress CPU per request, by step (median process CPU ms)", ["step", "CPU ms"], rows)
    loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
