"""What an idle service costs: CPU per process role while the app is up and nobody sends anything.

Each configuration runs in a fresh child process, because Ray reads its polling intervals when its
processes start: the child starts Ray (with the dashboard, as `serve run` does, unless
`--no-dashboard`), deploys serve_config.yaml's application over a small index with the
ViT-B/32-sized random checkpoint (what benchmarks.served deploys), sends a few searches so every
replica has loaded what it serves, waits `--settle` seconds, then samples /proc over its own process
tree for `--seconds` (benchmarks/proc_cpu.py; other people's processes on the machine do not count).

Configurations, alternated over `--rounds` so a drift of the machine hits both alike:
- `tuned`: serve_app/ray_env.py's settings, what scripts/run.sh and cluster/aws.yaml run;
- `ray defaults`: the same app with those variables removed from the environment (`--ray-defaults`
  adds this configuration; without it only `tuned` runs).

Target (issue 22): an idle service under 2% of one core. What is left once our settings apply is
Ray's own: every Ray Python process wakes every 10 ms to check for signals (no setting changes it),
the dashboard's processes, the GCS and the raylet; the table's rows show each.

    .venv/bin/python -m benchmarks.idle_cpu [--ray-defaults] [--seconds 60] [--rounds 2] [--no-dashboard]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import aiohttp

from benchmarks import proc_cpu
from benchmarks.common import machine_note, median, photo_jpeg, print_table, verdict, vit_b32_checkpoint
from serve_app import ray_env

IDLE_CPU_TARGET_PERCENT = 2.0
RESULT_MARKER = "IDLE_CPU_RESULT "
TUNED, DEFAULTS = "tuned", "ray defaults"
WARM_SEARCHES = 8


def child_environment(configuration: str) -> dict[str, str]:
    """This process's environment with serve_app/ray_env.py's settings applied or removed."""
    environ = dict(os.environ)
    for name in ray_env.IDLE_FRIENDLY:
        environ.pop(name, None)
    if configuration == TUNED:
        ray_env.apply(environ)
    return environ


async def warm_up(base_url: str, searches: int) -> None:
    """A few image searches, so every replica has loaded its model or index before the measurement."""
    async with aiohttp.ClientSession() as session:
        for seed in range(searches):
            form = aiohttp.FormData()
            form.add_field("files", photo_jpeg(seed), filename="q.jpg", content_type="image/jpeg")
            async with session.post(f"{base_url}/search", data=form) as response:
                if response.status != 200:
                    raise RuntimeError(f"warm-up search answered {response.status}: {await response.text()}")


def measure_in_this_process(model_dir: Path, index_dir: Path, seconds: float, settle: float, dashboard: bool) -> None:
    """Child: start Ray and the app with this environment, let it settle, print %CPU per role."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    from benchmarks.served import apply, deploy_config, measure_idle_cpu, wait_ready
    from tests.support import free_port

    port = free_port()
    ray.init(num_cpus=8, include_dashboard=dashboard, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        apply(_get_global_client(), deploy_config(model_dir, index_dir, port, max_batch_size=16))
        base_url = f"http://127.0.0.1:{port}"
        asyncio.run(wait_ready(base_url))
        asyncio.run(warm_up(base_url, WARM_SEARCHES))
        time.sleep(settle)  # replicas settle (first metrics pushes, health checks): part of what is measured
        by_role = measure_idle_cpu(seconds)
        by_role.pop(proc_cpu.CLIENT, None)  # this driver sleeps; it is not part of the service
        print(RESULT_MARKER + json.dumps(by_role), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


def run_child(configuration: str, model_dir: Path, index_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    command = [
        sys.executable,
        "-m",
        "benchmarks.idle_cpu",
        "--child",
        "--model",
        str(model_dir),
        "--index",
        str(index_dir),
        "--seconds",
        str(args.seconds),
        "--settle",
        str(args.settle),
    ] + (["--no-dashboard"] if args.no_dashboard else [])
    done = subprocess.run(
        command, env=child_environment(configuration), capture_output=True, text=True, timeout=args.seconds + 900
    )
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return {role: float(value) for role, value in json.loads(line[len(RESULT_MARKER) :]).items()}
    raise RuntimeError(f"{configuration} run gave no result (rc {done.returncode}):\n{done.stderr[-3000:]}")


def print_results(runs: dict[str, list[dict[str, float]]]) -> None:
    configurations = list(runs)
    roles = sorted({role for samples in runs.values() for sample in samples for role in sample})

    def role_median(configuration: str, role: str) -> float:
        return median([sample.get(role, 0.0) for sample in runs[configuration]])

    totals = {name: [sum(sample.values()) for sample in runs[name]] for name in configurations}
    rows = [[role, *(role_median(name, role) for name in configurations)] for role in roles]
    rows.sort(key=lambda row: -float(row[1]))
    rows.append(["all of the service (median of the runs' totals)", *(median(totals[name]) for name in configurations)])
    rows.append(["runs' totals", *(" / ".join(f"{value:.2f}" for value in totals[name]) for name in configurations)])
    print_table("CPU of the idle service (% of one core, median of the runs)", ["role", *configurations], rows)
    if DEFAULTS in runs:
        ratio = median(totals[TUNED]) / median(totals[DEFAULTS])
        print(f"tuned / ray defaults: {ratio:.3f}")
    verdict("idle service CPU, tuned", median(totals[TUNED]), IDLE_CPU_TARGET_PERCENT, False, "% of a core")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ray-defaults", action="store_true", help="also run with Ray's own polling intervals")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds per run (default 60)")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds between warm-up and measurement")
    parser.add_argument("--rounds", type=int, default=2, help="runs per configuration, alternated (default 2)")
    parser.add_argument("--no-dashboard", action="store_true", help="start Ray without its dashboard")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        measure_in_this_process(args.model, args.index, args.seconds, args.settle, not args.no_dashboard)
        return 0

    from benchmarks.served import build_index

    print(f"idle_cpu: {machine_note()}, {args.rounds} rounds x {args.seconds:.0f}s, dashboard {not args.no_dashboard}")
    model_dir = vit_b32_checkpoint()
    index_dir = build_index(model_dir, Path(tempfile.mkdtemp(prefix="idle-cpu-", dir=model_dir.parent)))
    configurations = [TUNED, DEFAULTS] if args.ray_defaults else [TUNED]
    runs: dict[str, list[dict[str, float]]] = defaultdict(list)
    for round_index in range(args.rounds):
        order = configurations if round_index % 2 == 0 else configurations[::-1]
        for configuration in order:
            sample = run_child(configuration, model_dir, index_dir, args)
            runs[configuration].append(sample)
            print(f"round {round_index + 1}, {configuration}: {sum(sample.values()):.2f}% of a core", flush=True)
    print_results({name: runs[name] for name in configurations})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
