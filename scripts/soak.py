"""Soak test: N clients on 127.0.0.1 for T seconds, valid and invalid uploads mixed.

Starts its own Ray + Serve application (a generated collection, a CLIP checkpoint made on the spot
unless --model is given), drives it, and prints requests, statuses, p50/p99 latency and each
replica's resident memory before and after. It stops by itself after --seconds.

    .venv/bin/python scripts/soak.py --clients 16 --seconds 120
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app import ray_env
from tests.support import make_clip_checkpoint, synthetic_image, write_image_folder


def payloads() -> list[tuple[str, str, bytes]]:
    """(kind, filename, bytes): mostly valid photos, some of every kind of bad input."""
    valid = []
    for seed in range(8):
        out = io.BytesIO()
        synthetic_image(1000 + seed, (640, 480)).save(out, format="JPEG", quality=90)
        valid.append(("valid", f"photo{seed}.jpg", out.getvalue()))
    invalid = [
        ("invalid", "text.jpg", b"not an image at all"),
        ("invalid", "empty.png", b""),
        ("invalid", "truncated.jpg", valid[0][2][:2000]),
        ("invalid", "doc.pdf", b"%PDF-1.7 nothing"),
    ]
    return valid * 4 + invalid  # ~1 in 9 invalid


def replica_rss_mb(app_name: str) -> dict[str, float]:
    import ray

    sizes = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if not name.startswith(f"SERVE_REPLICA::{app_name}#"):
            continue
        handle = ray.get_actor(name, namespace=actor["namespace"])
        pid = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
        status = Path(f"/proc/{pid}/status").read_text()
        rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
        sizes[name.split("#")[1] + "#" + name.split("#")[2][:6]] = round(rss_kb / 1024, 1)
    return dict(sorted(sizes.items()))


def drive(url: str, clients: int, seconds: float) -> tuple[Counter[str], list[float]]:
    items = payloads()
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        session = requests.Session()
        while time.monotonic() < deadline:
            kind, name, data = rng.choice(items)
            started = time.perf_counter()
            try:
                response = session.post(f"{url}/search", files=[("files", (name, data))], timeout=60)
                key = f"{kind}:{response.status_code}"
            except requests.RequestException as exc:
                key = f"{kind}:{type(exc).__name__}"
            elapsed = time.perf_counter() - started
            with lock:
                outcomes[key] += 1
                if kind == "valid":
                    latencies.append(elapsed)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--model", default=None, help="CLIP checkpoint folder (default: a tiny random one)")
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()

    import ray
    from ray import serve

    from index_builder.cli import main as build
    from serve_app.app import build_app
    from serve_app.config import AppArgs

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    model = args.model or str(make_clip_checkpoint(work / "model"))
    write_image_folder(work / "images", 64)
    if build(["--images", str(work / "images"), "--out", str(work / "index"), "--model", model, "--quiet"]) != 0:
        return 1
    ray_env.apply()  # what run.sh and the cluster run (serve_app/ray_env.py)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    app_args = AppArgs.model_validate({"model": model, "index": str(work / "index"), "embedder": {"num_threads": 1}})
    serve.run(build_app(app_args), name="soak", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    requests.post(f"{url}/search", files=[("files", ("w.jpg", payloads()[0][2]))], timeout=120)  # warm up

    before = replica_rss_mb("soak")
    outcomes, latencies = drive(url, args.clients, args.seconds)
    after = replica_rss_mb("soak")
    serve.shutdown()
    ray.shutdown()

    total = sum(outcomes.values())
    print(f"\nsoak: {args.clients} clients for {args.seconds:.0f} s on {url}")
    print(f"requests: {total} ({total / args.seconds:.1f}/s)")
    print("outcomes (kind:status):")
    for key, count in sorted(outcomes.items()):
        print(f"  {key:<28} {count}")
    server_errors = sum(count for key, count in outcomes.items() if key.split(":")[1].startswith("5"))
    print(f"5xx: {server_errors}")
    if latencies:
        quantiles = statistics.quantiles(latencies, n=100)
        print(f"valid-upload latency: p50 {quantiles[49] * 1000:.0f} ms, p99 {quantiles[98] * 1000:.0f} ms")
    print(f"{'replica':<22} {'RSS before MB':>14} {'RSS after MB':>13}")
    for name in before:
        print(f"{name:<22} {before[name]:>14} {after.get(name, float('nan')):>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
