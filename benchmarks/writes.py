"""Writes over HTTP while 16 clients search: time to visibility, write throughput, search p99 (issue 17).

Starts Ray in-process, builds a small index with the ViT-B/32-sized random checkpoint, deploys the
application with a write token, then, each for `--duration` seconds:
1. 16 closed-loop search clients alone (search p50/p99 without writes);
2. the same 16 search clients plus 4 writing clients, each POSTing a new 640x480 JPEG (`wait=indexed`)
   and then searching for it until the search returns its id: visibility = that search's answer time
   minus the time the POST was sent (p50/p95); writes/s over the phase; search p99 during writes.
The Embedder's own forward throughput (batch 16, in this process while Serve is idle) is measured in
the same run. Targets: p95 visibility <= 1 s; writes/s >= 0.7x the forward pass; search p99 during
writes <= 1.5x without.

    .venv/bin/python -m benchmarks.writes [--duration S] [--quick]

`--quick` runs a tiny model, 2 search clients, 1 writer and 3 s phases (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from benchmarks.common import (
    forward_seconds,
    machine_note,
    median,
    percentile,
    photo_jpeg,
    print_table,
    verdict,
    vit_b32_checkpoint,
    write_photo_folder,
)
from tests.support import free_port, make_clip_checkpoint

APP_NAME = "image_search"
TOKEN = "benchmark-write-token-0123456789abcdef"
COLLECTION = 48
SEARCH_CLIENTS = 16
WRITE_CLIENTS = 4
VISIBILITY_TARGET_S = 1.0
THROUGHPUT_RATIO_TARGET = 0.7
SEARCH_P99_RATIO_TARGET = 1.5
FORWARD_BATCH = 16


def search_once(url: str, data: bytes) -> list[int]:
    files = [("files", ("q.jpg", data, "image/jpeg"))]
    answer = requests.post(f"{url}/search", files=files, params={"k": 5}, timeout=60)
    answer.raise_for_status()
    return [match["id"] for match in answer.json()["results"][0]["matches"]]


def run_phase(url: str, seconds: float, searchers: int, writers: int, queries: list[bytes]) -> dict[str, Any]:
    stop = threading.Event()
    search_latencies: list[float] = []
    visibility: list[float] = []
    writes = [0]
    lock = threading.Lock()

    def searcher(number: int) -> None:
        i = number
        while not stop.is_set():
            started = time.perf_counter()
            search_once(url, queries[i % len(queries)])
            with lock:
                search_latencies.append(time.perf_counter() - started)
            i += searchers

    def writer(number: int) -> None:
        seed = 1_000_000 * (number + 1) + int(time.time() * 1000) % 1_000_000
        while not stop.is_set():
            seed += 1
            data = photo_jpeg(seed)
            sent = time.perf_counter()
            answer = requests.post(
                f"{url}/images",
                files=[("files", ("w.jpg", data, "image/jpeg"))],
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=60,
            )
            answer.raise_for_status()
            image_id = answer.json()["results"][0]["id"]
            while image_id not in search_once(url, data):
                pass  # read-your-writes should make the first search find it; measured either way
            with lock:
                visibility.append(time.perf_counter() - sent)
                writes[0] += 1

    threads = [threading.Thread(target=searcher, args=(n,)) for n in range(searchers)]
    threads += [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    stop.wait(seconds)  # the phase's length, not a synchronisation
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    return {"search": search_latencies, "visibility": visibility, "writes_per_s": writes[0] / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.writes", description=__doc__)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase (default 20)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few clients, 3 s phases")
    options = parser.parse_args(argv)
    searchers, writers = (2, 1) if options.quick else (SEARCH_CLIENTS, WRITE_CLIENTS)
    seconds = 3.0 if options.quick else options.duration

    import ray
    from ray import serve

    from image_search.encoder import ClipImageEncoder
    from index_builder.cli import main as build
    from serve_app.app import build_graph
    from serve_app.config import AppArgs

    print(machine_note(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-writes-") as work_dir:
        work = Path(work_dir)
        model = make_clip_checkpoint(work / "tiny") if options.quick else vit_b32_checkpoint()
        images, index = work / "collection", work / "index"
        write_photo_folder(images, COLLECTION, start_seed=20_000)
        if build(["--images", str(images), "--out", str(index), "--model", str(model), "--quiet"]) != 0:
            raise RuntimeError("index build failed")
        encoder = ClipImageEncoder(str(model), device="cpu", precision="auto")
        forward_img_s = FORWARD_BATCH / forward_seconds(encoder, FORWARD_BATCH, 3 if options.quick else 10)
        del encoder
        (work / "token").write_text(TOKEN)
        args = AppArgs.model_validate(
            {
                "model": str(model),
                "index": str(index),
                "reload_interval_s": 1,
                "writes": {"token_file": str(work / "token")},
            }
        )
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(build_graph(args), name=APP_NAME, route_prefix="/", blocking=False)
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 600
            while requests.get(f"{url}/healthz", timeout=10).status_code != 200:
                if time.monotonic() > deadline:
                    raise TimeoutError("the app did not become healthy")
                time.sleep(0.5)  # a readiness poll
            queries = [path.read_bytes() for path in sorted(images.iterdir())[:16]]
            alone = run_phase(url, seconds, searchers, 0, queries)
            during = run_phase(url, seconds, searchers, writers, queries)
        finally:
            serve.shutdown()
            ray.shutdown()

    p99_alone = percentile(alone["search"], 99)
    p99_during = percentile(during["search"], 99)
    vis = during["visibility"] or [float("nan")]
    print_table(
        f"writes while {searchers} clients search ({seconds:g} s per phase)",
        ["measure", "value"],
        [
            ["forward pass img/s (batch 16)", f"{forward_img_s:.1f}"],
            ["writes/s", f"{during['writes_per_s']:.2f}"],
            ["visibility p50 s", f"{median(vis):.3f}"],
            ["visibility p95 s", f"{percentile(vis, 95):.3f}"],
            [
                "search p50 ms alone / during",
                f"{median(alone['search']) * 1e3:.1f} / {median(during['search']) * 1e3:.1f}",
            ],
            ["search p99 ms alone / during", f"{p99_alone * 1e3:.1f} / {p99_during * 1e3:.1f}"],
        ],
    )
    verdict("visibility p95", percentile(vis, 95), VISIBILITY_TARGET_S, higher_is_better=False, unit=" s")
    verdict("writes/s vs forward img/s", during["writes_per_s"] / forward_img_s, THROUGHPUT_RATIO_TARGET)
    verdict("search p99 during / without writes", p99_during / p99_alone, SEARCH_P99_RATIO_TARGET, False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
