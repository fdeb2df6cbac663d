"""Index swap under load: publish -> first answer from the new version, live following vs a redeploy.

16 clients search over loopback the whole time. Each round adds images to the collection, rebuilds
with the builder's CLI in a subprocess (incremental), and measures from the moment CURRENT changed
to the first answer whose `index_version` is the new one, and the requests that failed meanwhile.

- live: the running app follows CURRENT by itself (`reload_interval_s`, default 1 s as shipped).
- baseline, redeploy: following off, and after each build `serve.run` of the application again
  (what the README used to advise), which replaces every replica.

    python -m benchmarks.swap [--rounds 3] [--interval 10] [--clients 16] [--images 200]

A tiny CLIP keeps the builds short: the swap itself does not depend on the model's size.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from serve_app import ray_env
from tests.support import free_port, make_clip_checkpoint, write_image_folder

APP = "swap"
REQUEST_TIMEOUT_S = 60
ROUND_TIMEOUT_S = 300


def build(images: Path, out: Path, model: Path) -> str:
    command = [sys.executable, "-m", "index_builder", "--images", str(images), "--out", str(out)]
    subprocess.run([*command, "--model", str(model), "--quiet"], check=True, capture_output=True, timeout=600)
    return (out / "CURRENT").read_text().strip()


class Load:
    """N client threads searching continuously; every answer's time, status and index_version."""

    def __init__(self, url: str, payload: bytes, clients: int) -> None:
        self.url, self.payload = url, payload
        self.answers: list[tuple[float, int, str | None]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]

    def client(self) -> None:
        files = [("files", ("q.jpg", self.payload, "image/jpeg"))]
        while not self.stop.is_set():
            try:
                response = requests.post(self.url, files=files, timeout=REQUEST_TIMEOUT_S)
                version = response.json().get("index_version") if response.status_code == 200 else None
                answer = (time.time(), response.status_code, version)
            except (requests.RequestException, ValueError):
                answer = (time.time(), -1, None)
            with self.lock:
                self.answers.append(answer)

    def first_answer_from(self, version: str, since: float) -> float:
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        while time.monotonic() < deadline:
            with self.lock:
                times = [t for t, status, v in self.answers if v == version and t >= since]
            if times:
                return min(times)
            time.sleep(0.05)
        raise TimeoutError(f"version {version} never answered")

    def failed_between(self, start: float, end: float) -> tuple[int, int]:
        with self.lock:
            window = [status for t, status, _ in self.answers if start <= t <= end]
        return sum(1 for status in window if status != 200), len(window)


def run_rounds(
    name: str, load: Load, collection: Path, out: Path, model: Path, rounds: int, after_build: Callable[[], None]
) -> list[dict[str, Any]]:
    results = []
    for round_ in range(rounds):
        write_image_folder(collection / f"{name}-{round_}", 2, start_seed=10_000 + 100 * round_ + len(name))
        version = build(collection, out, model)
        published = (out / "CURRENT").stat().st_mtime
        after_build()
        first = load.first_answer_from(version, published)
        failed, total = load.failed_between(published, first)
        results.append({"swap_s": first - published, "failed": failed, "requests": total})
        print(f"{name} round {round_}: {first - published:.2f} s, {failed}/{total} failed", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.swap", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval", type=float, default=1.0, help="reload_interval_s of the live run")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from serve_app.app import build_app

    work = Path(tempfile.mkdtemp(prefix="swap-bench-"))
    model = make_clip_checkpoint(work / "model")
    collection, out = work / "collection", work / "index"
    paths = write_image_folder(collection, args.images)
    build(collection, out, model)
    ray_env.apply()  # what run.sh and the cluster run (serve_app/ray_env.py)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/{APP}/search"

    def deploy(interval: float) -> None:
        app_args = {"model": str(model), "index": str(out), "reload_interval_s": interval}
        serve.run(build_app(app_args), name=APP, route_prefix=f"/{APP}")  # type: ignore[arg-type]

    rows = {}
    try:
        for name, interval in (("live", args.interval), ("redeploy", 0.0)):
            deploy(interval)
            load = Load(url, paths[0].read_bytes(), args.clients)
            for thread in load.threads:
                thread.start()
            after_build = (lambda: None) if name == "live" else (lambda: deploy(0.0))
            rows[name] = run_rounds(name, load, collection, out, model, args.rounds, after_build)
            load.stop.set()
            for thread in load.threads:
                thread.join(timeout=REQUEST_TIMEOUT_S + 5)
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\n{args.clients} clients, {args.images}+ images, {args.rounds} publishes each")
    # answers/s: requests answered between publish and the first new answer, per second of that window
    # (a redeploy also replaces the Embedder, so the service answers far less while it swaps).
    print(f"{'method':<26} {'median swap s':>14} {'max swap s':>11} {'failed/requests':>16} {'answers/s':>10}")
    for name, label in (("live", f"live (interval {args.interval:g} s)"), ("redeploy", "redeploy (baseline)")):
        swaps = [r["swap_s"] for r in rows[name]]
        failed = sum(r["failed"] for r in rows[name])
        total = sum(r["requests"] for r in rows[name])
        rate = total / sum(swaps)
        print(
            f"{label:<26} {statistics.median(swaps):>14.2f} {max(swaps):>11.2f} {f'{failed}/{total}':>16} {rate:>10.1f}"
        )
    live = statistics.median(r["swap_s"] for r in rows["live"])
    redeploy = statistics.median(r["swap_s"] for r in rows["redeploy"])
    print(f"redeploy / live median swap time: {redeploy / live:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
