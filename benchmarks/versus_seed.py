"""Served latency and throughput of the original seed (commit 00b2c70) against the current code, same load, same run.

What it measures: p50/p95/p99 latency, images/s and errors of `POST /search` (one 640x480 JPEG per
request, `--clients` closed-loop clients, default 16) against two deployments of the service, one
after the other and never both at once: the seed, as of commit 00b2c70 (the state before any of
the performance work), and the current working tree. Both serve the same ViT-B/32-sized random
checkpoint (benchmarks.common.vit_b32_checkpoint) over an index of the same 48 photos, the seed in
fp32 (its default) and the current code in `--precision` (default fp32, like for like; `auto`: as
shipped), each built by its own index builder. Rounds alternate the order (seed, current,
current, seed, ...) so drift on a shared machine hits both; consecutive measurements of one version
share one deployment. The verdicts are issue 10's targets: current p99 <= half the seed's at 16
clients, fp32, and the Ingress's CPU per request at most a third of the code's when the issue was
filed (`--against 090b0bf`: any commit can stand in for the seed); the throughput ratio is printed
beside them for information. CPU per process role is sampled from /proc over this process's tree
(the child's Ray cluster included), as in benchmarks.served.

How the seed runs, and why in a separate process: the seed and the current code both have
top-level packages named `serve_app` and `index_builder` (and the current one is installed
editable into the venv), so the two cannot be imported by one interpreter, nor by one Ray cluster
whose workers import the app by name. The seed is extracted with `git archive 00b2c70` into a
temporary folder; its index is built there by its own `python -m index_builder --images ... --out
... --model ...` (fp32, the seed's defaults), and it is served by a child process of this script
(this file run as a script with `--serve-seed`; cwd and PYTHONPATH = the seed folder, so the
child and its Ray workers import the seed's packages before the installed current ones). The child
does what `serve run serve_config.yaml` does with the seed's own serve_config.yaml (ray.init with
8 logical CPUs, `serve_start` with the config's proxy and HTTP options, `deploy_apps` of the whole
config), with only the HTTP port, `args.model` and `args.index` overridden and precision fp32 (the
seed's setting), prints a ready line, and shuts Serve and Ray down when its stdin closes or on
SIGTERM. The current app is deployed from this process through benchmarks.served's path
(serve_config.yaml as shipped; only the port, model, index and precision overridden), in its
own ray.init, after the seed's cluster is gone. RAY_worker_niceness=0 for both (benchmarks.served
explains why). Everything listens on 127.0.0.1 only and stops by itself.

    .venv/bin/python -m benchmarks.versus_seed [--against COMMIT] [--precision P] [--duration S] [--rounds N]
                                               [--clients 16] [--warmup S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

# Only the standard library at module level: with --serve-seed this file runs as a script inside
# the seed's checkout, where `benchmarks`, `tests` and `serve_app` are the seed's packages.

SEED_COMMIT = "00b2c70"
REPO_ROOT = Path(__file__).resolve().parents[1]
READY_LINE = "versus_seed: seed app ready"
P99_RATIO_TARGET = 0.5  # issue 10: p99 at 16 clients <= half the seed's under the same load (fp32)
# Issue 10: the Ingress's CPU per request at most a third of the code's when the issue was filed
# (commit 090b0bf; `--against 090b0bf` measures exactly that pair).
INGRESS_CPU_RATIO_TARGET = 1 / 3
THROUGHPUT_RATIO_TARGET = 1.0  # informational
START_TIMEOUT_S = 420.0
STOP_TIMEOUT_S = 90.0


# --- the seed's side (runs in the child process, inside the seed's checkout) ---------------------


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def serve_seed(seed_dir: Path, model: str, index: str, port: int) -> int:
    """Deploy the seed's serve_config.yaml like `serve run` does; serve until stdin closes or SIGTERM."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
    # Ray gives its workers the driver script's folder on sys.path; ours (benchmarks/ of the current
    # checkout) is of no use to the seed's workers, so it is not on ours either.
    here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if not entry or Path(entry).resolve() != here]
    import ray
    import yaml
    from ray import serve
    from ray.serve._private import api as private_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    import serve_app  # the seed's (PYTHONPATH), checked below

    loaded_from = Path(serve_app.__file__).resolve()
    if not loaded_from.is_relative_to(seed_dir.resolve()):
        print(f"versus_seed: serve_app imported from {loaded_from}, not from the seed's {seed_dir}", flush=True)
        return 2
    config = yaml.safe_load((seed_dir / "serve_config.yaml").read_text())
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    app["args"]["model"] = model
    app["args"]["index"] = index
    app["args"].setdefault("embedder", {})["precision"] = "fp32"
    schema = ServeDeploySchema.model_validate(config)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="serve")
    try:
        client = private_api.serve_start(
            http_options=schema.http_options.model_dump(),
            proxy_location=schema.proxy_location,
            grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
            controller_options=schema.controller_options,
        )
        client.deploy_apps(schema, _blocking=False)
        name = app["name"]
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            status = serve.status().applications.get(name)
            if status is not None and status.status == "RUNNING":
                break
            if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                print(f"versus_seed: seed app {status.status}: {status.message}", flush=True)
                return 1
            if time.monotonic() > deadline:
                print(f"versus_seed: seed app not RUNNING after {START_TIMEOUT_S:.0f}s", flush=True)
                return 1
            time.sleep(0.5)
        print(READY_LINE, flush=True)
        sys.stdin.read()  # until the parent closes our stdin (or exits)
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()


# --- this side (the parent) ----------------------------------------------------------------------


def extract_seed(work: Path, commit: str) -> Path:
    seed_dir = work / "seed"
    seed_dir.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(seed_dir)], input=archive, check=True)
    return seed_dir


def seed_env(seed_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # First on sys.path, before the editable install's finder: the seed's serve_app/index_builder.
    env["PYTHONPATH"] = str(seed_dir)
    env.setdefault("RAY_worker_niceness", "0")  # main() has set it already: the same for both versions
    env.pop("RAY_ADDRESS", None)
    return env


def build_seed_index(seed_dir: Path, images: Path, model_dir: Path, out: Path) -> None:
    """The seed's own builder, in the seed's checkout (its index format, fp32: its only precision)."""
    command = [sys.executable, "-m", "index_builder", "--images", str(images), "--out", str(out)]
    command += ["--model", str(model_dir), "--precision", "fp32", "--quiet"]
    done = subprocess.run(command, cwd=seed_dir, env=seed_env(seed_dir), capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"seed index build failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    print(f"seed index: {done.stdout.strip()}", flush=True)


def stop_child(process: subprocess.Popen[bytes]) -> None:
    """Close its stdin (it shuts Serve and Ray down), then SIGTERM, then SIGKILL: by its pid only."""
    if process.stdin is not None and not process.stdin.closed:
        process.stdin.close()
    for send in (None, signal.SIGTERM, signal.SIGKILL):
        if send is not None and process.poll() is None:
            process.send_signal(send)
        try:
            process.wait(timeout=STOP_TIMEOUT_S if send is None else 30)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def seed_app(seed_dir: Path, model_dir: Path, index_dir: Path, work: Path) -> Iterator[str]:
    """The seed served by a child process on a free 127.0.0.1 port; yields its base URL."""
    from tests.support import free_port

    port = free_port()
    log_path = work / f"seed-server-{port}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-seed", "--seed-dir", str(seed_dir)]
    command += ["--model", str(model_dir), "--index", str(index_dir), "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=seed_dir,
            env=seed_env(seed_dir),
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C here reaches us only; we stop it through its stdin
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S + 30
        while READY_LINE not in log_path.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"the seed app did not start (exit {process.returncode}); its log ends:\n{tail}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_child(process)


@contextmanager
def current_app(model_dir: Path, index_dir: Path, precision: str) -> Iterator[str]:
    """The current app from serve_config.yaml as shipped, fp32, in this process's own Ray; yields its base URL."""
    import ray
    import yaml
    from ray import serve
    from ray.serve.context import _get_global_client

    from benchmarks.served import apply, deploy_config
    from serve_app import ray_env
    from tests.support import free_port

    shipped = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    (embedder,) = (item for item in shipped["applications"][0]["deployments"] if item["name"] == "Embedder")
    port = free_port()
    ray_env.apply()  # ours as run.sh runs it (serve_app/ray_env.py); the seed ran before, with Ray's defaults
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = deploy_config(
            model_dir, index_dir, port, embedder["user_config"]["max_batch_size"], precision=precision
        )
        apply(_get_global_client(), config)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


async def check_app(base_url: str, jpeg: bytes) -> dict[str, Any]:
    """Ready, answers one search with matches; returns its /info."""
    import aiohttp

    from benchmarks.served import wait_ready

    await wait_ready(base_url)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        async with session.get(f"{base_url}/info") as response:
            info: dict[str, Any] = await response.json()
        form = aiohttp.FormData()
        form.add_field("files", jpeg, filename="check.jpg", content_type="image/jpeg")
        async with session.post(f"{base_url}/search", data=form) as response:
            body = await response.read()
            if response.status != 200 or not json.loads(body)["results"][0].get("matches"):
                raise RuntimeError(f"{base_url}/search answered {response.status}: {body[:300]!r}")
    return info


def schedule(rounds: int) -> list[list[str]]:
    """Measurements in order, consecutive ones of one version grouped (one deployment each group)."""
    order: list[str] = []
    for round_index in range(rounds):
        order += ["seed", "current"] if round_index % 2 == 0 else ["current", "seed"]
    groups: list[list[str]] = []
    for version in order:
        if groups and groups[-1][0] == version:
            groups[-1].append(version)
        else:
            groups.append([version])
    return groups


def current_label() -> str:
    head = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "serve_app", "image_search", "serve_config.yaml"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"current {head or '?'}{' + uncommitted changes' if dirty else ''}"


def report(
    results: dict[str, list[dict[str, Any]]], labels: dict[str, str], clients: int, rounds: int, duration: float
) -> None:
    """The table (medians over rounds) and the verdicts."""
    from benchmarks.common import median, print_table, verdict

    def med(version: str, key: str) -> float:
        return median([run[key] for run in results[version]])

    rows = [
        [
            labels[version],
            clients,
            med(version, "img_s"),
            med(version, "p50_ms"),
            med(version, "p95_ms"),
            med(version, "p99_ms"),
            sum(run["errors"] for run in results[version]),
            sum(run["count"] for run in results[version]),
        ]
        for version in ("seed", "current")
    ]
    print_table(
        f"Baseline (fp32) vs current, served (median of {rounds} rounds of {duration:.0f}s; "
        f"POST /search, one 640x480 JPEG per request; requests timed: summed over rounds, p99 needs ~100+)",
        ["version", "clients", "img/s", "p50 ms", "p95 ms", "p99 ms", "errors", "requests timed"],
        rows,
    )
    verdict(
        f"current p99 / {labels['seed']} p99 at {clients} clients",
        med("current", "p99_ms") / med("seed", "p99_ms"),
        P99_RATIO_TARGET,
        higher_is_better=False,
    )
    roles = sorted({role for version in results for run in results[version] for role in run["cpu"]})
    print_table(
        f"CPU per process role at {clients} clients (% of one core, median of rounds, from /proc)",
        ["role", labels["seed"], labels["current"]],
        [
            [role, *(median([run["cpu"].get(role, 0.0) for run in results[v]]) for v in ("seed", "current"))]
            for role in roles
        ]
        + [["Ingress CPU ms per request", med("seed", "ingress_ms"), med("current", "ingress_ms")]],
    )
    verdict(
        f"current / {labels['seed']} Ingress CPU per request",
        med("current", "ingress_ms") / med("seed", "ingress_ms"),
        INGRESS_CPU_RATIO_TARGET,
        higher_is_better=False,
    )
    verdict(
        f"current img/s / {labels['seed']} img/s at {clients} clients (informational)",
        med("current", "img_s") / med("seed", "img_s"),
        THROUGHPUT_RATIO_TARGET,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per version and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (seed, current), order alternating")
    parser.add_argument("--clients", type=int, default=16, help="closed-loop clients (issue 10's target: 16)")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each measurement")
    parser.add_argument(
        "--against",
        default=SEED_COMMIT,
        help=f"commit to compare with (default: the seed, {SEED_COMMIT}; 090b0bf: the code when issue 10 was filed)",
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        help="the current app's embedder.precision (default fp32, like the seed; auto: as shipped)",
    )
    parser.add_argument("--serve-seed", action="store_true", help=argparse.SUPPRESS)  # the child's mode
    parser.add_argument("--seed-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--index", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Ray starts its workers at nice 15 by default; same priority as everything else (see served).
    os.environ.setdefault("RAY_worker_niceness", "0")
    if args.serve_seed:
        return serve_seed(args.seed_dir, args.model, args.index, args.port)
    if args.rounds < 1 or args.duration <= 0 or args.clients < 1:
        parser.error("--rounds, --duration and --clients must be positive")

    from benchmarks import proc_cpu
    from benchmarks.common import machine_note, photo_jpeg, vit_b32_checkpoint
    from benchmarks.served import QUERY_IMAGES, build_index, drive

    groups = schedule(args.rounds)
    print(
        f"versus_seed: {machine_note()}, {args.rounds} rounds x ({args.against}, current) x "
        f"{args.clients} clients x {args.duration:.0f}s (+{args.warmup:.0f}s warm-up), "
        f"{args.against} in fp32, current in {args.precision}",
        flush=True,
    )
    labels = {
        "seed": f"{'seed' if args.against == SEED_COMMIT else 'baseline'} {args.against}",
        "current": f"{current_label()}, {args.precision}",
    }
    model_dir = vit_b32_checkpoint()
    work = Path(tempfile.mkdtemp(prefix="versus-seed-", dir=model_dir.parent))
    results: dict[str, list[dict[str, Any]]] = {"seed": [], "current": []}
    try:
        index_dir = build_index(model_dir, work)  # the current builder; also writes work/collection
        seed_dir = extract_seed(work, args.against)
        seed_index = work / "seed-index"
        build_seed_index(seed_dir, work / "collection", model_dir, seed_index)
        jpegs = [photo_jpeg(seed) for seed in range(QUERY_IMAGES)]
        for group in groups:
            version = group[0]
            started = time.monotonic()
            app = (
                seed_app(seed_dir, model_dir, seed_index, work)
                if version == "seed"
                else current_app(model_dir, index_dir, args.precision)
            )
            with app as base_url:
                info = asyncio.run(check_app(base_url, jpegs[0]))
                print(
                    f"{labels[version]}: up in {time.monotonic() - started:.0f}s, /info precision "
                    f"{info.get('precision', '- (seed: fp32 only)')}, index size {info.get('index_size')}",
                    flush=True,
                )
                for _ in group:
                    before, cpu_started = proc_cpu.sample(), time.monotonic()
                    result = asyncio.run(drive(base_url, jpegs, args.clients, args.duration, args.warmup))
                    seconds = time.monotonic() - cpu_started
                    result["cpu"] = proc_cpu.cpu_percent_by_role(
                        before, proc_cpu.sample(), seconds, proc_cpu.ticks_per_second()
                    )
                    # Ingress CPU over every answered request of the measurement (warm-up included).
                    result["ingress_ms"] = 10 * result["cpu"].get("Ingress", 0.0) * seconds / max(result["answered"], 1)
                    results[version].append(result)
                    print(
                        f"round {len(results[version])} {labels[version]}: {result['img_s']:.2f} img/s "
                        f"p50 {result['p50_ms']:.0f} ms p99 {result['p99_ms']:.0f} ms "
                        f"({result['count']} requests, {result['errors']} errors), "
                        f"Ingress {result['ingress_ms']:.2f} ms CPU per request",
                        flush=True,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report(results, labels, args.clients, args.rounds, args.duration)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
