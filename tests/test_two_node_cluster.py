"""serve_config.cluster.yaml's placement scheme on a real multi-node Ray cluster, on this machine.

Three `ray start` nodes stand for the AWS node types (cluster/README.md): a head (`head_node`,
no CPUs), a `cpu_worker` node and a `gpu_worker` node (a logical GPU; the Embedder runs on the CPU).
The config is deployed with `serve deploy` through the head's dashboard, with token authentication
on, and the test checks that searches answer over HTTP and that every replica runs on the node type
its deployment asks for. The config is sharded (`searcher.shards: 2`, deployments `Searcher_0` and
`Searcher_1` with two replicas each) and serves an index of three segments; a second application in
the same deployment (`unsharded`, one `Searcher`) serves the same index, so the test can check that
2 shards answer what 1 Searcher answers, and that killing a replica of one shard fails no request
while the shard's other replica serves.

Isolation from the session's in-process Ray (`ray_cluster`): this cluster has its own temp dir,
its own ports (all chosen free), and its own auth token (RAY_AUTH_TOKEN, never ~/.ray/auth_token).
Each node is a `ray start --block` child of this test, in its own process group: teardown
terminates exactly those (no `ray stop`, which would kill every Ray process on the machine).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests import images
from tests.conftest import REPO_ROOT, wait_until_ok
from tests.living import build, current_version, manifest_of
from tests.support import free_port, post_search
from tests.test_faults import load_while

BIN = Path(sys.executable).parent
APP = "image_search"
NODE_TIMEOUT_S = 90
DEPLOY_TIMEOUT_S = 240
START_ATTEMPTS = 3

# node name -> (custom resources, `ray start` resource flags)
NODES: dict[str, tuple[dict[str, float], list[str]]] = {
    "head": ({"head_node": 1}, ["--num-cpus=0"]),
    # Logical CPUs: 2 shards x 2 Searcher replicas and the Ingress (1 each), and the comparison app (3 x 0.5).
    "cpu": ({"cpu_worker": 1}, ["--num-cpus=7"]),
    "gpu": ({"gpu_worker": 1}, ["--num-cpus=2", "--num-gpus=1"]),
}
# deployment -> the custom resource of the node type it must run on (serve_config.cluster.yaml)
SEARCHERS = ("Searcher_0", "Searcher_1")  # serve_config.cluster.yaml: searcher.shards 2
EXPECTED_PLACEMENT = {"Embedder": "gpu_worker", **dict.fromkeys(SEARCHERS, "cpu_worker"), "Ingress": "cpu_worker"}
REPLICAS = {"Embedder": 1, **dict.fromkeys(SEARCHERS, 2), "Ingress": 1}
# The comparison application: the same index behind one Searcher, all on the cpu node, small CPU asks.
UNSHARDED = "unsharded"
SMALL_ON_CPU_NODE = {"num_cpus": 0.5, "resources": {"cpu_worker": 0.01}}


@dataclass
class LocalCluster:
    temp_dir: Path
    gcs_address: str
    dashboard_url: str
    token: str
    env: dict[str, str]
    processes: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(f"{self.dashboard_url}{path}", headers=self.auth, timeout=30, **kwargs)

    def nodes(self) -> list[dict[str, Any]]:
        response = self.get("/api/v0/nodes", params={"detail": "1", "limit": "100"})
        response.raise_for_status()
        return list(response.json()["data"]["result"]["result"])

    def log_tail(self, chars: int = 4000) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}" for log in self.logs)


def start_node(
    cluster_env: dict[str, str], name: str, args: list[str], log_dir: Path, attempt: int = 1
) -> tuple[subprocess.Popen, Path]:
    resources, flags = NODES[name]
    ports = [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]
    log = log_dir / f"{name}-{attempt}.log"
    command = [
        str(BIN / "ray"),
        "start",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address=127.0.0.1",
        f"--resources={json.dumps(resources)}",
        *flags,
        *ports,
        *args,
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            env=cluster_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return process, log


def stop_nodes(processes: list[subprocess.Popen]) -> None:
    """SIGTERM makes each `ray start --block` stop its node's processes; then sweep their process groups."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 45
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    # Anything of a node left behind (its own process group: only processes this test started).
    for process in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


class NodeExited(RuntimeError):
    """A `ray start` process ended while the test waited on the cluster."""


def wait_for(check: Any, what: str, timeout_s: float, cluster: LocalCluster) -> Any:
    """Poll `check()` until it returns something truthy (bounded); the cluster's logs on timeout."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        for process in cluster.processes:
            if process.poll() is not None:
                raise NodeExited(
                    f"a Ray node exited ({process.returncode}) while waiting for {what}\n{cluster.log_tail()}"
                )
        try:
            result = check()
            if result:
                return result
            last = result
        except (requests.RequestException, KeyError, ValueError) as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{what} not reached after {timeout_s}s (last: {last})\n{cluster.log_tail()}")


def start_with_retries(
    cluster: LocalCluster, name: str, make_args: Callable[[], list[str]], ready: Callable[[], bool]
) -> None:
    """Start one node and wait until `ready()`; start it again if it dies while starting.

    Ray gives a raylet a fixed 30 s to register with the GCS and then gives up; on a loaded 2-core
    machine (other Ray instances running) that can happen, so a node gets a few attempts.
    """
    for attempt in range(1, START_ATTEMPTS + 1):
        process, log = start_node(cluster.env, name, make_args(), cluster.temp_dir, attempt)
        cluster.processes.append(process)
        cluster.logs.append(log)
        try:
            wait_for(ready, f"the {name} node", NODE_TIMEOUT_S, cluster)
            return
        except NodeExited:
            cluster.processes.remove(process)
            stop_nodes([process])
            if attempt == START_ATTEMPTS:
                raise


def node_alive_with(cluster: LocalCluster, resource: str) -> bool:
    return any(node["state"] == "ALIVE" and node["resources_total"].get(resource) for node in cluster.nodes())


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    # Short: Ray's unix socket paths live under it and must stay under ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray2n-", dir="/tmp"))
    token = secrets.token_hex(32)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "AWS_"))}
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "RAY_USAGE_STATS_ENABLED": "0",
            # A stopped node drains for up to 30 s by default; a test cluster has nothing to hand over.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "3",
        }
    )
    cluster = LocalCluster(temp_dir=temp_dir, gcs_address="", dashboard_url="", token=token, env=env)

    def head_args() -> list[str]:
        gcs_port, dashboard_port = free_port(), free_port()
        cluster.gcs_address = f"127.0.0.1:{gcs_port}"
        cluster.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        return [
            "--head",
            f"--port={gcs_port}",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}",
        ]

    try:
        start_with_retries(cluster, "head", head_args, lambda: node_alive_with(cluster, "head_node"))
        # One worker at a time: two raylets starting together on 2 cores is what makes one miss its 30 s.
        for name in ("cpu", "gpu"):
            resource = next(iter(NODES[name][0]))
            ready = functools.partial(node_alive_with, cluster, resource)
            start_with_retries(cluster, name, lambda: [f"--address={cluster.gcs_address}"], ready)
        yield cluster
    finally:
        stop_nodes(cluster.processes)
        shutil.rmtree(temp_dir, ignore_errors=True)


def derived_config(index_dir: Path, model_dir: Path, http_port: int) -> dict[str, Any]:
    """serve_config.cluster.yaml, pointed at the test's model and index and sized for this machine.

    Deployments keep their `ray_actor_options` (resources) exactly; only replica counts shrink.
    One HTTP proxy (HeadOnly): with EveryNode each of the three nodes would start one on the same
    port of this one machine.
    """
    original = yaml.safe_load((REPO_ROOT / "serve_config.cluster.yaml").read_text())
    config = copy.deepcopy(original)
    config["proxy_location"] = "HeadOnly"
    config["http_options"].update({"host": "127.0.0.1", "port": http_port})
    (app,) = config["applications"]
    app["args"]["model"] = str(model_dir)
    app["args"]["index"] = str(index_dir)
    app["args"]["embedder"] = {"precision": "fp32", "device": "cpu", "num_threads": 1}
    for deployment in app["deployments"]:
        count = REPLICAS[deployment["name"]]
        deployment["autoscaling_config"].update(min_replicas=count, initial_replicas=count, max_replicas=count)
    for before, after in zip(original["applications"][0]["deployments"], app["deployments"], strict=True):
        assert before["ray_actor_options"] == after["ray_actor_options"]
    unsharded_args = copy.deepcopy(app["args"])
    unsharded_args["searcher"] = {"num_threads": 1}  # shards: 1, the default
    config["applications"].append(
        {
            "name": UNSHARDED,
            "route_prefix": f"/{UNSHARDED}",
            "import_path": app["import_path"],
            "args": unsharded_args,
            "deployments": [
                {"name": name, "num_replicas": 1, "ray_actor_options": SMALL_ON_CPU_NODE}
                for name in ("Embedder", "Searcher", "Ingress")
            ],
        }
    )
    return config


@pytest.fixture(scope="module")
def staged_index(image_folder: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's collection built in three steps: three segments, so each of two shards holds some."""
    from image_search.segments import read_current_version
    from image_search.shards import version_shard
    from image_search.storage import LocalStore

    root = tmp_path_factory.mktemp("staged")
    collection, out = root / "collection", root / "index"
    files = sorted(p for p in image_folder.rglob("*") if p.is_file())
    for stage in (files[:12], files[12:20], files[20:]):
        for path in stage:
            target = collection / path.relative_to(image_folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        build(collection, out, tiny_model_dir)
    version = read_current_version(LocalStore(out))
    assert version is not None and len(version.segments) == 3
    assert all(version_shard(version, shard, 2).segments for shard in range(2))
    return out


def serve_cli(cluster: LocalCluster, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "serve"), *args, "-a", cluster.dashboard_url],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture(scope="module")
def deployed(cluster: LocalCluster, staged_index: Path, tiny_model_dir: Path) -> str:
    http_port = free_port()
    config_path = cluster.temp_dir / "serve_config.test.yaml"
    config_path.write_text(yaml.safe_dump(derived_config(staged_index, tiny_model_dir, http_port), sort_keys=False))
    result = serve_cli(cluster, "deploy", str(config_path))
    assert result.returncode == 0, result.stdout + result.stderr

    def running() -> bool:
        details = cluster.get("/api/serve/applications/").json()
        for name in (APP, UNSHARDED):
            status = details["applications"][name]["status"]
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise AssertionError(f"{name} is {status}: {details['applications'][name].get('message')}")
            if status != "RUNNING":
                return False
        return True

    wait_for(running, f"{APP} and {UNSHARDED} RUNNING", DEPLOY_TIMEOUT_S, cluster)
    base = f"http://127.0.0.1:{http_port}"
    wait_until_ok(f"{base}/healthz", timeout_s=60)
    wait_until_ok(f"{base}/{UNSHARDED}/healthz", timeout_s=60)
    return base


def staged_records(staged_index: Path) -> dict[int, str]:
    """id -> key of the staged index's live images."""
    manifest = manifest_of(staged_index, current_version(staged_index))
    return {int(record["id"]): str(record["key"]) for record in manifest["records"]}


def test_token_authentication_is_on(cluster: LocalCluster) -> None:
    assert requests.get(f"{cluster.dashboard_url}/api/serve/applications/", timeout=30).status_code in (401, 403)
    assert cluster.get("/api/serve/applications/").status_code == 200
    status = serve_cli(cluster, "status")
    assert status.returncode == 0, status.stderr


def test_serve_cli_finds_the_token_file_the_way_the_readme_says(cluster: LocalCluster, tmp_path: Path) -> None:
    """README: `RAY_AUTH_MODE=token serve status` with the token in ~/.ray/auth_token (where a local Ray writes it)."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(cluster.token)
    env = {key: value for key, value in cluster.env.items() if key not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env["HOME"] = str(home)

    def status(extra: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "serve"), "status", "-a", cluster.dashboard_url],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    refused = status({})
    assert refused.returncode != 0
    assert "token" in (refused.stdout + refused.stderr).lower()
    allowed = status({"RAY_AUTH_MODE": "token"})
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr


def test_searches_answer_over_http(deployed: str, staged_index: Path, image_folder: Path) -> None:
    records = staged_records(staged_index)
    for expected_id in (0, 13, 22):  # one from each segment
        path = image_folder / records[expected_id]
        response = post_search(deployed, [(path.name, path.read_bytes())])
        assert response.status_code == 200, response.text
        top = response.json()["results"][0]["matches"][0]
        assert top["id"] == expected_id and top["score"] >= 0.99
    info = requests.get(f"{deployed}/info", timeout=30).json()
    assert info["index_size"] == 24


def both(deployed: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    """The JSON the sharded and the unsharded application answer (200 both), checked equal (urls aside)."""
    bodies = []
    for base, prefix in ((deployed, ""), (f"{deployed}/{UNSHARDED}", f"/{UNSHARDED}")):
        response = requests.request(method, f"{base}{path}", timeout=60, **kwargs)
        assert response.status_code == 200, (base, path, response.text)
        text = response.text.replace(f'"{prefix}/', '"/') if prefix else response.text
        bodies.append(json.loads(text))
    assert bodies[0] == bodies[1], path
    return dict(bodies[0])


def test_two_shards_answer_what_one_searcher_answers(deployed: str, staged_index: Path, image_folder: Path) -> None:
    records = staged_records(staged_index)
    for image_id in (1, 12, 21):
        path = image_folder / records[image_id]
        files = [("files", (path.name, path.read_bytes(), "image/jpeg"))]
        body = both(deployed, "POST", "/search", files=files, data={"text": "a red circle"}, params={"k": 24})
        assert len(body["results"][0]["matches"]) == 24  # every image: both shards' segments in one ranking
        both(deployed, "GET", f"/images/{image_id}/similar", params={"k": 6, "prefix": "nested/"})
        both(deployed, "GET", f"/images/{image_id}/similar", params={"k": 4, "dedup": "true"})
    both(deployed, "GET", "/search", params={"q": "a blue square", "k": 5})
    both(deployed, "GET", "/duplicates", params={"threshold": "0.9"})


def running_pids(cluster: LocalCluster, app: str, deployment: str) -> list[int]:
    details = cluster.get("/api/serve/applications/").json()["applications"][app]["deployments"][deployment]
    return [int(replica["pid"]) for replica in details["replicas"] if replica["state"] == "RUNNING"]


def test_a_killed_shard_replica_fails_no_request(cluster: LocalCluster, deployed: str) -> None:
    """SIGKILL one of shard 1's two replicas under load: every search still answers 200 (not partial:
    allow_partial is off, so each answer holds shard 1's segments, from its other replica), and Serve
    starts a replacement."""
    pids = running_pids(cluster, APP, "Searcher_1")
    assert len(pids) == 2
    victim = pids[0]
    outcomes = load_while(
        deployed, images.jpeg(12), action_after=6, action=lambda: os.kill(victim, signal.SIGKILL), after_action=30
    )
    statuses = [status for _, status in outcomes]
    assert statuses.count(200) == len(statuses), statuses

    def replaced() -> bool:
        now = running_pids(cluster, APP, "Searcher_1")
        return len(now) == 2 and victim not in now

    wait_for(replaced, "a replacement Searcher_1 replica", DEPLOY_TIMEOUT_S, cluster)
    assert len(running_pids(cluster, APP, "Searcher_0")) == 2  # the other shard was never touched


def test_each_deployment_runs_on_its_node_type(cluster: LocalCluster, deployed: str) -> None:
    node_resources = {node["node_id"]: node["resources_total"] for node in cluster.nodes() if node["state"] == "ALIVE"}
    deployments = cluster.get("/api/serve/applications/").json()["applications"][APP]["deployments"]
    placed: dict[str, list[str]] = {}
    for name, expected in EXPECTED_PLACEMENT.items():
        replicas = [replica for replica in deployments[name]["replicas"] if replica["state"] == "RUNNING"]
        assert len(replicas) == REPLICAS[name], (name, replicas)
        for replica in replicas:
            resources = node_resources[replica["node_id"]]
            assert resources.get(expected, 0) == 1, (name, replica["node_id"], resources)
        placed[name] = [replica["node_id"] for replica in replicas]
    head = next(node_id for node_id, resources in node_resources.items() if resources.get("head_node"))
    assert all(head not in node_ids for node_ids in placed.values())
    # The Embedder holds the (logical) GPU of its node.
    gpu_node = next(node_id for node_id, resources in node_resources.items() if resources.get("gpu_worker"))
    assert set(placed["Embedder"]) == {gpu_node}


def test_batching_changes_in_place_with_serve_deploy(
    cluster: LocalCluster, deployed: str, staged_index: Path, tiny_model_dir: Path, image_folder: Path
) -> None:
    """Editing the Embedder's user_config and running `serve deploy` again reconfigures the running
    replica (same process), as the README promises."""

    def embedder() -> dict[str, Any]:
        details = cluster.get("/api/serve/applications/").json()["applications"][APP]
        return details["deployments"]["Embedder"]

    before = embedder()
    pids_before = {replica["pid"] for replica in before["replicas"] if replica["state"] == "RUNNING"}
    http_port = int(deployed.rsplit(":", 1)[1])
    config = derived_config(staged_index, tiny_model_dir, http_port)
    (embedder_config,) = (d for d in config["applications"][0]["deployments"] if d["name"] == "Embedder")
    embedder_config["user_config"] = {"max_batch_size": 3, "batch_wait_timeout_s": 0.002}
    config_path = cluster.temp_dir / "serve_config.batching.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = serve_cli(cluster, "deploy", str(config_path))
    assert result.returncode == 0, result.stdout + result.stderr

    def applied() -> bool:
        current = embedder()
        return bool(
            current["status"] == "HEALTHY"
            and current["deployment_config"]["user_config"] == embedder_config["user_config"]
        )

    wait_for(applied, "new user_config applied", DEPLOY_TIMEOUT_S, cluster)
    pids_after = {replica["pid"] for replica in embedder()["replicas"] if replica["state"] == "RUNNING"}
    assert pids_after == pids_before
    path = image_folder / staged_records(staged_index)[3]
    response = post_search(deployed, [(path.name, path.read_bytes())])
    assert response.status_code == 200 and response.json()["results"][0]["matches"][0]["id"] == 3
