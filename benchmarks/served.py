"""End-to-end throughput and latency through HTTP, batched vs unbatched, against the in-process ceiling.

Starts Ray in-process (like tests/conftest.py), builds a small index with the ViT-B/32-sized random
checkpoint, deploys the application from serve_config.yaml (only `args.model`, `args.index` and the
Embedder's `user_config` are overridden; `embedder.num_threads` is 2 as shipped), and drives it with
1/4/16/32 closed-loop clients, each POSTing one 640x480 JPEG per request to 127.0.0.1 for a fixed time.

How the batching is switched at run time: the app is deployed the way `serve deploy serve_config.yaml`
does it, as a ServeDeploySchema applied by the Serve controller (`ServeControllerClient.deploy_apps`).
Re-applying the same config with only the Embedder's `user_config` changed is a lightweight update:
Serve calls `Embedder.reconfigure` on the running replica (no restart, no model reload). The
alternatives were worse: `serve.run(build_app(args))` cannot override a deployment's options without
rebuilding the graph by hand (duplicating build_app) or editing the private `Application._bound_deployment`;
a DeploymentHandle cannot reconfigure; `serve deploy` needs the dashboard's REST API. `deploy_apps`
is not a documented public API, but it is what the CLI and the dashboard call, and it exercises the
real config path (import_path + args + deployment overrides), so it is the most faithful choice.

Baselines bracket each measured phase (benchmarks/bracket.py): the fp32 batch-32 forward pass (the
throughput ceiling) and the batch-1 forward pass in the served precision (latency), sampled at steady
state in this process right before and right after each phase with Serve idle (the first side with
the app stopped); each phase's ratio uses its own bracket, and a bracket whose sides differ by more
than 15% turns the verdict into "too noisy, run again". The idle app's cost is printed too: the
forward's speed with the app stopped vs up and idle, and the app's own CPU while nobody sends
anything (target: under 2% of a core).

Where a lone request's time goes: around every 1-client level the Ingress, the Embedder and each
Searcher replica are asked for their stage totals (serve_app/stage_times.py, always on, sums only),
and the table splits the client's mean latency into the proxy and Serve's ASGI path, reading the
form, decode + crop, the Embedder call (handle + gRPC, its queue, the hand-offs to and from the
model thread, the forward pass), the Searcher call (handle + gRPC, the FAISS search) and the JSON.

Also printed: `top`-style %CPU per process role at 16 clients (Ingress, Embedder, Searchers, proxy,
controller, raylet, GCS, dashboard, this client), sampled from /proc over this run's own process
tree (benchmarks/proc_cpu.py), and the Ingress's CPU milliseconds per request. `--profile-ingress`
adds where the Ingress's CPU goes, by function (py-spy on the replica during the first 16-client
level). `--precision` sets embedder.precision (default: the config's, auto); the ceiling stays fp32
(issue 10's targets: served@16 >= 0.7x of it in fp32, >= 1.2x in auto = bf16 here), and the
latency baseline is the batch-1 forward in the precision the app serves.

Text rows (`run_text_rows`): `GET /search?q=` at 1 and 16 clients against the text tower's own
forward speed (fp32, batch 64 and batch 1, in this process while Serve is idle); `--text-only`
runs just those.

    .venv/bin/python -m benchmarks.served [--quick] [--duration S] [--rounds N] [--text-only]
                                          [--precision P] [--profile-ingress] [--serve-same-loop]
                                          [--clients 1,16] [--no-text] [--baseline-seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import torch
import yaml

from benchmarks import proc_cpu, stacks
from benchmarks.bracket import Baseline, Bracket, bracketed_ratios, bracketed_verdict, steady_samples
from benchmarks.common import (
    forward_sampler,
    machine_note,
    median,
    percentile,
    photo_jpeg,
    print_table,
    verdict,
    vit_b32_checkpoint,
    write_photo_folder,
)
from image_search.encoder import ClipImageEncoder
from image_search.precision import host_cpu_flags, resolve_precision
from image_search.text_encoder import ClipTextEncoder
from serve_app import ray_env
from serve_app.stage_times import Snapshot, mean_between, merge
from tests.support import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_NAME = "image_search"
CONCURRENCY = (1, 4, 16, 32)
# Issue 10's targets for served@16 against the fp32 batch-32 forward pass: 0.7x when the app
# serves fp32, 1.2x with precision auto where it resolves to bf16 (a CPU with native bf16).
# Issue 22's targets, each against its phase's own bracket.
CEILING_RATIO_TARGETS = {"fp32": 0.8, "bf16": 1.2}
BATCHING_GAIN_TARGET = 1.5
LATENCY_OVERHEAD_TARGET_MS = 20.0
IDLE_CPU_TARGET_PERCENT = 2.0
OUR_REPLICA_ROLES = ("Ingress", "Embedder", "Searchers")
COLLECTION = 48
QUERY_IMAGES = 64


def build_index(model_dir: Path, work: Path) -> Path:
    from index_builder.cli import main as build

    images = work / "collection"
    write_photo_folder(images, COLLECTION, start_seed=10_000)
    out = work / "index"
    code = build(["--images", str(images), "--out", str(out), "--model", str(model_dir), "--quiet"])
    if code != 0:
        raise RuntimeError("index build failed")
    return out


def deploy_config(
    model_dir: Path,
    index_dir: Path,
    port: int,
    max_batch_size: int,
    embedder_threads: int = 2,
    omp_wait_policy: str | None = None,
    batch_wait_s: float | None = None,
    precision: str | None = None,
    env_vars: dict[str, str] | None = None,
) -> Any:
    """serve_config.yaml with our model/index and the given Embedder batch size."""
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    config = copy.deepcopy(config)
    config["http_options"] = {"host": "127.0.0.1", "port": port, "request_timeout_s": 60}
    (app,) = config["applications"]
    app["args"]["model"] = str(model_dir)
    app["args"]["index"] = str(index_dir)
    app["args"].setdefault("embedder", {})["num_threads"] = embedder_threads
    if precision is not None:
        app["args"]["embedder"]["precision"] = precision
    if env_vars:
        app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env_vars)
    for deployment in app["deployments"]:
        if deployment["name"] == "Embedder":
            deployment["user_config"] = {**deployment.get("user_config", {}), "max_batch_size": max_batch_size}
            if batch_wait_s is not None:
                deployment["user_config"]["batch_wait_timeout_s"] = batch_wait_s
            if omp_wait_policy:
                # OpenMP threads that spin at barriers collapse when the cores are shared (see README).
                options = deployment.setdefault("ray_actor_options", {})
                options.setdefault("runtime_env", {}).setdefault("env_vars", {})["OMP_WAIT_POLICY"] = omp_wait_policy
    return ServeDeploySchema.model_validate(config)


def apply(client: Any, config: Any, timeout_s: float = 600) -> None:
    """Apply the config and wait until the app is RUNNING again (deploy_apps' own wait gives up after 60 s)."""
    from ray import serve

    client.deploy_apps(config, _blocking=False)
    deadline = time.monotonic() + timeout_s
    time.sleep(1.0)
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"{APP_NAME} is {app.status}: {app.message}")
        time.sleep(0.5)
    raise TimeoutError(f"{APP_NAME} not RUNNING after {timeout_s}s")


async def wait_ready(base_url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{base_url}/healthz", timeout=aiohttp.ClientTimeout(total=5)) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{base_url} not ready after {timeout_s}s")


async def drive(base_url: str, jpegs: list[bytes], clients: int, duration_s: float, warmup_s: float) -> dict[str, Any]:
    """Closed loop: each client sends one request at a time until the deadline; stops by itself.

    Requests in flight at the deadline are awaited (bounded by the client timeout) for their latency.
    """
    latencies: list[float] = []
    answered_s = 0.0  # latency summed over every 200, warm-up included (what the replicas' stage times cover)
    errors = completed = answered = 0
    measuring_from = time.monotonic() + warmup_s
    deadline = measuring_from + duration_s
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=clients)

    async def client(session: aiohttp.ClientSession, offset: int) -> None:
        nonlocal errors, completed, answered, answered_s
        sent = offset
        while time.monotonic() < deadline:
            form = aiohttp.FormData()
            form.add_field("files", jpegs[sent % len(jpegs)], filename=f"q{sent}.jpg", content_type="image/jpeg")
            sent += clients
            started = time.monotonic()
            async with session.post(f"{base_url}/search", data=form) as response:
                await response.read()
                ok = response.status == 200
            finished = time.monotonic()
            answered += ok
            answered_s += (finished - started) if ok else 0.0
            if not ok:
                errors += started >= measuring_from
            elif measuring_from <= finished <= deadline:
                completed += 1  # throughput: completions inside the window, whenever they started
            if ok and started >= measuring_from:
                latencies.append(finished - started)  # latency: requests sent inside the window

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(client(session, offset) for offset in range(clients)))
    return {
        "img_s": completed / duration_s,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p95_ms": 1000 * percentile(latencies, 95),
        "p99_ms": 1000 * percentile(latencies, 99),
        "mean_all_ms": 1000 * answered_s / max(answered, 1),
        "count": len(latencies),
        "errors": errors,
        "answered": answered,  # every 200, warm-up and tail included (what the CPU samples cover)
    }


# --- text queries ------------------------------------------------------------------------------

TEXT_CONCURRENCY = (1, 16)
TEXT_CEILING_BATCH = 64
SUBJECTS = ("a red bicycle", "two cats", "a busy market", "a small boat", "an old bridge", "a snowy forest", "a dog")
PLACES = ("by a canal", "on a table", "at night", "in the rain", "near the sea", "in a park", "under a tree", "")


def text_queries() -> list[str]:
    """56 distinct photo-caption-like phrases (4 to 9 tokens, like typed queries)."""
    return [f"{subject} {place}".strip() for subject in SUBJECTS for place in PLACES]


def text_forward_sampler(encoder: ClipTextEncoder, texts: list[str]) -> Callable[[], float]:
    """A callable timing one text-tower forward pass on `texts` (tokenised once; the bracket warms it up)."""
    rows = np.stack([encoder.token_row(encoder.tokenize(text)) for text in texts])

    def sample() -> float:
        started = time.perf_counter()
        encoder.encode_rows(rows)
        return time.perf_counter() - started

    return sample


async def drive_text(
    base_url: str, texts: list[str], clients: int, duration_s: float, warmup_s: float
) -> dict[str, Any]:
    """Closed loop like `drive`, each request one `GET /search?q=` text query."""
    latencies: list[float] = []
    errors = completed = 0
    measuring_from = time.monotonic() + warmup_s
    deadline = measuring_from + duration_s

    async def client(session: aiohttp.ClientSession, offset: int) -> None:
        nonlocal errors, completed
        sent = offset
        while time.monotonic() < deadline:
            query = texts[sent % len(texts)]
            sent += clients
            started = time.monotonic()
            async with session.get(f"{base_url}/search", params={"q": query}) as response:
                await response.read()
                ok = response.status == 200
            finished = time.monotonic()
            if not ok:
                errors += started >= measuring_from
            elif measuring_from <= finished <= deadline:
                completed += 1
            if ok and started >= measuring_from:
                latencies.append(finished - started)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(*(client(session, offset) for offset in range(clients)))
    return {
        "q_s": completed / duration_s,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p95_ms": 1000 * percentile(latencies, 95),
        "errors": errors,
    }


def run_text_rows(
    base_url: str, embedder: Any, model_dir: Path, rounds: int, duration_s: float, warmup_s: float
) -> None:
    """Served text queries/s at 1 and 16 clients vs the text tower's own forward speed, one table."""
    local = ClipTextEncoder(str(model_dir), device="cpu", precision="fp32")
    texts = text_queries()
    runs: dict[int, list[dict[str, Any]]] = defaultdict(list)
    brackets: dict[int, list[Bracket]] = defaultdict(list)

    text_forward = text_forward_sampler(local, (texts * 2)[:TEXT_CEILING_BATCH])

    def measure_side() -> Baseline:
        side = steady_samples(lambda: TEXT_CEILING_BATCH / text_forward(), "app idle")
        print(f"text baseline (app idle): texts/s at batch {TEXT_CEILING_BATCH} {side.describe()}", flush=True)
        return side

    before_side = measure_side()
    for round_index in range(rounds):
        for clients in TEXT_CONCURRENCY:
            before = dict(embedder.text_batch_size_counts.remote().result())
            result = asyncio.run(drive_text(base_url, texts, clients, duration_s, warmup_s))
            result["mean_batch"] = mean_batch(before, dict(embedder.text_batch_size_counts.remote().result()))
            runs[clients].append(result)
            print(
                f"text round {round_index + 1} clients {clients:>2}: {result['q_s']:.1f} q/s "
                f"p50 {result['p50_ms']:.0f} ms mean batch {result['mean_batch']:.1f} errors {result['errors']}",
                flush=True,
            )
            after_side = measure_side()
            brackets[clients].append(Bracket(before_side, after_side))
            before_side = after_side
    rows = []
    for clients in TEXT_CONCURRENCY:
        q_s = median([run["q_s"] for run in runs[clients]])
        ratio = median(bracketed_ratios([run["q_s"] for run in runs[clients]], brackets[clients]))
        rows.append(
            [
                "GET /search?q=",
                clients,
                q_s,
                ratio,
                100 * max(bracket.drift for bracket in brackets[clients]),
                median([run["p50_ms"] for run in runs[clients]]),
                median([run["p95_ms"] for run in runs[clients]]),
                median([run["mean_batch"] for run in runs[clients]]),
                sum(run["errors"] for run in runs[clients]),
            ]
        )
    print_table(
        f"Served text queries (median of {rounds} rounds; each level against its own bracket of the text "
        f"tower's fp32 batch-{TEXT_CEILING_BATCH} forward, app idle)",
        [
            "route",
            "clients",
            "queries/s",
            "vs text tower",
            "bracket drift %",
            "p50 ms",
            "p95 ms",
            "mean batch",
            "errors",
        ],
        rows,
    )


# --- where one lone request's time goes ---------------------------------------------------------

SEARCHER_SNAPSHOT_CALLS = 16  # handle calls that reach each Searcher replica (routing picks one per call)


def stage_snapshots(ingress: Any, embedder: Any, searcher: Any) -> tuple[Snapshot, Snapshot, dict[int, Snapshot]]:
    """The stage totals of the Ingress, the Embedder and each Searcher replica (by pid) now."""
    searchers: dict[int, Snapshot] = {}
    for _ in range(SEARCHER_SNAPSHOT_CALLS):
        pid, snapshot = searcher.stage_times.remote().result()
        searchers[pid] = snapshot
    return ingress.stage_times.remote().result(), embedder.stage_times.remote().result(), searchers


def stage_means(
    before: tuple[Snapshot, Snapshot, dict[int, Snapshot]], after: tuple[Snapshot, Snapshot, dict[int, Snapshot]]
) -> dict[str, float]:
    """Mean ms per request of each stage between two snapshots, named by where it happened."""
    ingress = mean_between(before[0], after[0])
    embedder = mean_between(before[1], after[1])
    both = [pid for pid in after[2] if pid in before[2]]  # a replica seen only once has no "before"
    searcher = mean_between(merge([before[2][pid] for pid in both]), merge([after[2][pid] for pid in both]))
    means = {f"Ingress: {stage}": value for stage, value in ingress.items()}
    means.update({f"Embedder: {stage}": value for stage, value in embedder.items()})
    means.update({f"Searcher: {stage}": value for stage, value in searcher.items()})
    return {stage: 1000 * value for stage, value in means.items()}


def breakdown_rows(client_ms: float, means: dict[str, float]) -> list[list[Any]]:
    """One lone request, end to end: each measured stage and the gaps between nested ones (ms, means)."""

    def get(stage: str) -> float:
        return means.get(stage, float("nan"))

    handler = get("Ingress: handler")
    embed_call, embed_in = get("Ingress: Embedder calls"), get("Embedder: in replica")
    search_call, search_in = get("Ingress: Searcher call"), get("Searcher: in replica")
    forward = get("Embedder: forward")
    embedder_parts = [get(f"Embedder: {stage}") for stage in ("queue", "stack", "to model thread", "from model thread")]
    return [
        ["client: whole request (aiohttp, 127.0.0.1)", client_ms],
        ["  proxy + Serve's ASGI path + client (whole minus Ingress handler)", client_ms - handler],
        ["  Ingress handler (search route)", handler],
        ["    read form (body from the proxy, multipart)", get("Ingress: read form")],
        ["    decode + crop (incl. its thread hop)", get("Ingress: decode + crop")],
        ["    Embedder call, as awaited", embed_call],
        ["      handle call + gRPC (call minus in replica)", embed_call - embed_in],
        ["      in the Embedder replica", embed_in],
        ["        queue (submitted until its pass formed)", embedder_parts[0]],
        ["        stack the crops", embedder_parts[1]],
        ["        hand-off to the model thread", embedder_parts[2]],
        ["        forward pass (encode_pixels)", forward],
        ["        hand-off back from the model thread", embedder_parts[3]],
        ["        rest (embed wrapper, result)", embed_in - forward - sum(embedder_parts)],
        ["    vectors stacked", get("Ingress: vectors stacked")],
        ["    Searcher call, as awaited", search_call],
        ["      handle call + gRPC (call minus in replica)", search_call - search_in],
        ["      in the Searcher replica", search_in],
        ["        FAISS search (incl. its thread hop)", get("Searcher: search (on its thread)")],
        ["    results + JSON", get("Ingress: results + JSON")],
    ]


def print_breakdowns(breakdowns: dict[str, list[tuple[float, dict[str, float]]]]) -> None:
    """The 1-client breakdown per variant (median over rounds of each row)."""
    names = list(breakdowns)
    tables = {name: [breakdown_rows(client, means) for client, means in breakdowns[name]] for name in names}
    labels = [label for label, _ in breakdown_rows(0.0, {})]
    rows = [
        [label, *(median([rows[index][1] for rows in tables[name]]) for name in names)]
        for index, label in enumerate(labels)
    ]
    print_table(
        "Where a lone request's time goes (1 client, mean ms per request, median of rounds; stages timed inside "
        "the replicas, serve_app/stage_times.py; indented rows are parts of the row above)",
        ["stage", *names],
        rows,
    )


def batch_counts(embedder: Any) -> dict[int, int]:
    return dict(embedder.batch_size_counts.remote().result())


def mean_batch(before: dict[int, int], after: dict[int, int]) -> float:
    batches = sum(after.get(size, 0) - before.get(size, 0) for size in after)
    images = sum(size * (after.get(size, 0) - before.get(size, 0)) for size in after)
    return images / batches if batches else float("nan")


def start_ingress_profile(now: proc_cpu.Sample, seconds: float, work: Path) -> tuple[Any, Path] | None:
    """py-spy recording the (first) Ingress replica of this run for `seconds`, or None."""
    pids = sorted(pid for pid, role in now.roles.items() if role == "Ingress")
    out = work / "ingress.stacks"
    process = stacks.record(pids[0], seconds, out) if pids else None
    if process is None:
        print("profile: no Ingress process or no py-spy; skipped", flush=True)
        return None
    return process, out


def print_profile(process: Any, out: Path, top: int = 40) -> None:
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        print("profile: py-spy did not finish", flush=True)
        return
    if not out.is_file():
        print(f"profile: py-spy wrote nothing (exit {process.returncode})", flush=True)
        return
    total, shares = stacks.inclusive_shares(stacks.parse_collapsed(out.read_text()))
    print_table(
        f"Ingress CPU at 16 clients by function (py-spy, {total} samples of busy threads; inclusive share)",
        ["function (file:line)", "share"],
        [[frame[:110], share] for frame, share in shares[:top]],
    )


def print_cpu_table(results: dict[tuple[str, int], list[dict[str, Any]]], variants: list[str], clients: int) -> None:
    """`top`-style %CPU per process role at one client level (median over rounds), and the Ingress's CPU per request."""
    roles = sorted({role for name in variants for run in results[(name, clients)] for role in run["cpu"]})
    rows = []
    for role in roles:
        shares = [median([run["cpu"].get(role, 0.0) for run in results[(name, clients)]]) for name in variants]
        rows.append([role, *shares])
    per_request = []
    for name in variants:
        runs = results[(name, clients)]
        # Ingress CPU seconds over every answered request of the level (warm-up and tail included).
        per_request.append(
            median([10 * run["cpu"].get("Ingress", 0.0) * run["cpu_s"] / max(run["answered"], 1) for run in runs])
        )
    rows.append(["Ingress CPU ms per request", *per_request])
    print_table(
        f"CPU per process role at {clients} clients (% of one core, from /proc, this run's process tree only)",
        ["role", *variants],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs, one round")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per level (default 15, quick 8)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of (batched, unbatched) (default 2, quick 1)")
    parser.add_argument(
        "--worker-niceness", type=int, default=0, help="nice value of Ray workers (Ray's default is 15; see main)"
    )
    parser.add_argument(
        "--omp-wait-policy", choices=("PASSIVE", "ACTIVE"), default=None, help="OMP_WAIT_POLICY of the Embedder"
    )
    parser.add_argument("--batch-wait", type=float, default=None, help="batch_wait_timeout_s (default: the config's)")
    parser.add_argument("--embedder-threads", type=int, default=2, help="embedder.num_threads (default 2)")
    parser.add_argument("--batch", type=int, default=16, help="max_batch_size of the batched variant (16 or 32)")
    parser.add_argument(
        "--serve-same-loop",
        action="store_true",
        help="replicas run user code and the handle router on their main event loop (two Ray 2.60 switches)",
    )
    parser.add_argument(
        "--profile-ingress",
        action="store_true",
        help="py-spy the Ingress during the first 16-client level and print where its CPU goes",
    )
    parser.add_argument(
        "--precision", default=None, help="embedder.precision (default: serve_config.yaml's, auto); the ceiling is fp32"
    )
    parser.add_argument("--text-only", action="store_true", help="only the text rows (GET /search?q=)")
    parser.add_argument(
        "--baseline-seconds", type=float, default=8.0, help="seconds per baseline side, after warm-up (default 8)"
    )
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="seconds the idle app's CPU is sampled")
    parser.add_argument(
        "--clients",
        default=",".join(str(level) for level in CONCURRENCY),
        help="client levels, comma-separated (default 1,4,16,32; the verdicts need 1 and 16)",
    )
    parser.add_argument("--no-text", action="store_true", help="skip the text rows after the image rounds")
    args = parser.parse_args(argv)
    levels_run = tuple(int(level) for level in args.clients.split(","))
    duration = args.duration or (8.0 if args.quick else 15.0)
    rounds = args.rounds or (1 if args.quick else 2)
    warmup = 3.0
    levels = f"{len(TEXT_CONCURRENCY)} text levels" if args.text_only else f"{len(levels_run)} levels x 2 configs"
    print(f"served: {machine_note()}, {rounds} rounds x {levels} x {duration:.0f}s")

    # Ray starts its workers (every Serve replica and the HTTP proxy) at nice 15 by default. On a
    # machine shared with other work that starves the app against this non-niced process and its
    # ceiling baseline, so the ratios would measure the scheduler, not Serve. Same priority for all:
    os.environ.setdefault("RAY_worker_niceness", str(args.worker_niceness))
    # Ray 2.60 runs each replica's user code, and its handles' router, on event loops in threads
    # of their own; the profile of the Ingress shows the hops between them (see README). Set for
    # the app's replicas only: this driver's own handle calls (.result(), no event loop) need the
    # separate router loop.
    env_vars = (
        {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
        if args.serve_same_loop
        else {}
    )
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    model_dir = vit_b32_checkpoint()
    work = Path(tempfile.mkdtemp(prefix="served-", dir=model_dir.parent))
    index_dir = build_index(model_dir, work)
    jpegs = [photo_jpeg(seed) for seed in range(QUERY_IMAGES)]

    torch.set_num_threads(2)
    local = ClipImageEncoder(str(model_dir), device="cpu", precision="fp32")
    # What the Embedder will run (auto resolved as it resolves it): the latency baseline is the
    # batch-1 forward in that precision, so the overhead compares like with like.
    shipped = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]
    served_precision = resolve_precision(
        args.precision or shipped.get("embedder", {}).get("precision", "auto"), "cpu", host_cpu_flags()
    )
    local_served = (
        local
        if served_precision == "fp32"
        else ClipImageEncoder(str(model_dir), device="cpu", precision=served_precision)
    )

    ceiling_forward, single_forward = forward_sampler(local, 32), forward_sampler(local_served, 1)

    def measure_sides(state: str) -> tuple[Baseline, Baseline]:
        """One side of the brackets: the fp32 batch-32 ceiling (img/s) and the served batch-1 forward (s)."""
        ceiling = steady_samples(lambda: 32 / ceiling_forward(), state, args.baseline_seconds)
        single = steady_samples(single_forward, state, args.baseline_seconds)
        print(f"baseline ({state}): fp32 ceiling img/s {ceiling.describe()}")
        print(f"baseline ({state}): {served_precision} batch-1 forward s {single.describe()}", flush=True)
        return ceiling, single

    sides: list[tuple[Baseline, Baseline]] = []
    if not args.text_only:
        sides.append(measure_sides("app stopped"))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    ray_env.apply()  # what run.sh and the cluster run: idle-friendly polling (serve_app/ray_env.py)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    results: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        client = _get_global_client()
        variants = {f"max_batch_size {args.batch}": args.batch, "max_batch_size 1": 1}
        # The app's config differs between deploys only in the Embedder's max_batch_size.
        config_for = partial(
            deploy_config,
            model_dir,
            index_dir,
            port,
            embedder_threads=args.embedder_threads,
            omp_wait_policy=args.omp_wait_policy,
            batch_wait_s=args.batch_wait,
            precision=args.precision,
            env_vars=env_vars,
        )
        started = time.monotonic()
        apply(
            client,
            config_for(args.batch),
        )
        asyncio.run(wait_ready(base_url))
        print(f"deployed in {time.monotonic() - started:.0f}s", flush=True)
        embedder = serve.get_deployment_handle("Embedder", app_name=APP_NAME)
        ingress = serve.get_deployment_handle("Ingress", app_name=APP_NAME)
        searcher = serve.get_deployment_handle("Searcher", app_name=APP_NAME)
        if args.text_only:
            run_text_rows(base_url, embedder, model_dir, rounds, duration, warmup)
            return 0
        sides.append(measure_sides("app idle"))
        # After that side, not right after the deploy: replicas settle (first metrics pushes, preloads) first.
        idle_cpu = measure_idle_cpu(args.idle_seconds)
        print(f"idle app CPU (% of a core): {', '.join(f'{r} {v:.2f}' for r, v in sorted(idle_cpu.items()))}")
        profiled = False
        phase_brackets: dict[tuple[str, int], list[tuple[Bracket, Bracket]]] = defaultdict(list)
        breakdowns: dict[str, list[tuple[float, dict[str, float]]]] = defaultdict(list)
        for round_index in range(rounds):
            names = list(variants) if round_index % 2 == 0 else list(variants)[::-1]
            for name in names:
                apply(
                    client,
                    config_for(variants[name]),
                )
                asyncio.run(wait_ready(base_url))
                for clients in levels_run:
                    before = batch_counts(embedder)
                    cpu_before, cpu_started = proc_cpu.sample(), time.monotonic()
                    profile = None
                    if args.profile_ingress and clients == 16 and not profiled:
                        profile = start_ingress_profile(cpu_before, warmup + duration, work)
                        profiled = True
                    stages_before = stage_snapshots(ingress, embedder, searcher) if clients == 1 else None
                    result = asyncio.run(drive(base_url, jpegs, clients, duration, warmup))
                    if stages_before is not None:
                        # Means over every request of the level (its warm-up included), like mean_all_ms.
                        means = stage_means(stages_before, stage_snapshots(ingress, embedder, searcher))
                        breakdowns[name].append((result["mean_all_ms"], means))
                    if profile is not None:
                        print_profile(*profile)
                    result["cpu"] = proc_cpu.cpu_percent_by_role(
                        cpu_before, proc_cpu.sample(), time.monotonic() - cpu_started, proc_cpu.ticks_per_second()
                    )
                    result["cpu_s"] = time.monotonic() - cpu_started
                    result["mean_batch"] = mean_batch(before, batch_counts(embedder))
                    results[(name, clients)].append(result)
                    print(
                        f"round {round_index + 1} {name:>18} clients {clients:>2}: {result['img_s']:.2f} img/s "
                        f"p50 {result['p50_ms']:.0f} ms mean batch {result['mean_batch']:.1f} "
                        f"errors {result['errors']}",
                        flush=True,
                    )
                # Right after the phase, with Serve idle: with the side taken right before it, its bracket.
                sides.append(measure_sides("app idle"))
                (ceiling_before, single_before), (ceiling_after, single_after) = sides[-2], sides[-1]
                for clients in levels_run:
                    phase_brackets[(name, clients)].append(
                        (Bracket(ceiling_before, ceiling_after), Bracket(single_before, single_after))
                    )
        if not args.no_text:
            apply(
                client,
                config_for(args.batch),
            )
            asyncio.run(wait_ready(base_url))
            run_text_rows(base_url, embedder, model_dir, rounds, duration, warmup)
    finally:
        serve.shutdown()
        ray.shutdown()

    print_idle_costs(sides, idle_cpu)
    rows = []
    for name in variants:
        for clients in levels_run:
            runs = results[(name, clients)]
            rate = median([run["img_s"] for run in runs])
            ceilings = [bracket.value for bracket, _ in phase_brackets[(name, clients)]]
            rows.append(
                [
                    name,
                    clients,
                    rate,
                    median(
                        bracketed_ratios(
                            [run["img_s"] for run in runs], [b for b, _ in phase_brackets[(name, clients)]]
                        )
                    ),
                    median(ceilings),
                    median([run["p50_ms"] for run in runs]),
                    median([run["p95_ms"] for run in runs]),
                    median([run["p99_ms"] for run in runs]),
                    median([run["mean_batch"] for run in runs]),
                    sum(run["errors"] for run in runs),
                ]
            )
    print_table(
        f"Served throughput (median of {rounds} rounds; each phase against its own bracket: the fp32 batch-32 "
        f"ceiling and the {served_precision} batch-1 forward sampled right before and right after it with the "
        f"app idle; the app served {served_precision})",
        [
            "Embedder batching",
            "clients",
            "img/s",
            "vs its bracket",
            "bracket img/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "mean batch",
            "errors",
        ],
        rows,
    )
    if 16 in levels_run:
        print_cpu_table(results, list(variants), 16)
    if 1 in levels_run:
        print_breakdowns({name: breakdowns[name] for name in variants})
    batched = f"max_batch_size {args.batch}"

    def ratios(name: str, clients: int) -> list[float]:
        brackets = [b for b, _ in phase_brackets[(name, clients)]]
        return bracketed_ratios([run["img_s"] for run in results[(name, clients)]], brackets)

    def brackets_of(name: str, clients: int) -> list[Bracket]:
        return [bracket for pair in phase_brackets[(name, clients)] for bracket in pair]

    if 16 in levels_run:
        throughput_verdicts(served_precision, batched, ratios, brackets_of)
    if 1 not in levels_run:
        return 0
    for name in variants:
        overheads = [
            run["p50_ms"] - 1000 * single.value
            for run, (_, single) in zip(results[(name, 1)], phase_brackets[(name, 1)], strict=True)
        ]
        bracketed_verdict(
            f"latency, 1 client, {name}: p50 minus {served_precision} batch-1 forward",
            median(overheads),
            LATENCY_OVERHEAD_TARGET_MS,
            brackets_of(name, 1),
            False,
            " ms",
        )
    return 0


def throughput_verdicts(
    served_precision: str,
    batched: str,
    ratios: Callable[[str, int], list[float]],
    brackets_of: Callable[[str, int], list[Bracket]],
) -> None:
    """Issue 22's throughput lines at 16 clients, each against its phases' own brackets."""
    bracketed_verdict(
        f"served@16 in {served_precision} / fp32 batch-32 ceiling",
        median(ratios(batched, 16)),
        CEILING_RATIO_TARGETS[served_precision],
        brackets_of(batched, 16),
    )
    bracketed_verdict(
        "batched / unbatched at 16 clients",
        median(ratios(batched, 16)) / median(ratios("max_batch_size 1", 16)),
        BATCHING_GAIN_TARGET,
        [*brackets_of(batched, 16), *brackets_of("max_batch_size 1", 16)],
    )


def measure_idle_cpu(seconds: float) -> dict[str, float]:
    """%CPU of one core per process role while the app is up and nobody sends a request."""
    before, started = proc_cpu.sample(), time.monotonic()
    time.sleep(seconds)  # the measured interval itself, not a synchronisation
    return proc_cpu.cpu_percent_by_role(
        before, proc_cpu.sample(), time.monotonic() - started, proc_cpu.ticks_per_second()
    )


def print_idle_costs(sides: list[tuple[Baseline, Baseline]], idle_cpu: dict[str, float]) -> None:
    """What an idle app costs: the forward's speed with it stopped vs up and idle, and its own CPU."""
    if len(sides) >= 2:
        stopped, idle = sides[0][0], sides[1][0]
        print(
            f"fp32 batch-32 forward: {stopped.median:.2f} img/s with the app stopped, {idle.median:.2f} with it up "
            f"and idle ({idle.median / stopped.median:.3f}x)"
        )
    app_cpu = {role: value for role, value in idle_cpu.items() if role != proc_cpu.CLIENT}  # this driver sleeps
    print_table(
        "CPU of the idle app (% of one core, nobody sending requests)",
        ["role", "CPU %"],
        [[role, value] for role, value in sorted(app_cpu.items(), key=lambda item: -item[1])]
        + [["all of the app", sum(app_cpu.values())]],
    )
    verdict("idle app CPU (all roles)", sum(app_cpu.values()), IDLE_CPU_TARGET_PERCENT, False, "% of a core")
    # Which part is ours: the replicas of our deployments (our pollers, health checks and whatever Serve
    # runs inside every replica) against Ray's and Serve's own processes (controller, proxy, GCS, raylet, agents).
    ours = sum(app_cpu.get(role, 0.0) for role in OUR_REPLICA_ROLES)
    print(
        f"of which our deployments' replicas ({', '.join(OUR_REPLICA_ROLES)}): {ours:.2f}% of a core; "
        f"Ray's and Serve's own processes: {sum(app_cpu.values()) - ours:.2f}%"
    )


if __name__ == "__main__":
    raise SystemExit(main())
