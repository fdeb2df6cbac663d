"""Helpers for the living-collection tests: builds through the builder's CLI, versions on disk, a served app."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
import requests

from tests.conftest import wait_until_ok

FOLLOW_TIMEOUT_S = 120
RELOAD_INTERVAL_S = 0.5  # fast following keeps the tests short; the default is 10 s


def build(images: Path, out: Path, model: Path, *extra: str) -> str:
    """Run the builder as a user would (incremental by default) and return the version it published."""
    from index_builder.cli import main

    assert main(["--images", str(images), "--out", str(out), "--model", str(model), "--quiet", *extra]) == 0
    return current_version(out)


def current_version(out: Path) -> str:
    return (out / "CURRENT").read_text().strip()


def manifest_of(out: Path, version: str) -> dict[str, Any]:
    """A published version as one manifest-shaped dict (its live records, model fields, next_id)."""
    from image_search.artifact import load_artifact
    from image_search.storage import LocalStore

    return json.loads(load_artifact(LocalStore(out), version).manifest.to_json())


def ids_and_keys(manifest: dict[str, Any]) -> dict[int, str]:
    return {record["id"]: record["key"] for record in manifest["records"]}


def point_current_at(out: Path, version: str) -> None:
    """Publish by hand the way the builder does: an atomic rename over CURRENT."""
    tmp = out / ".CURRENT.test.tmp"
    tmp.write_text(version + "\n")
    os.replace(tmp, out / "CURRENT")


def poll(check: Callable[[], Any], timeout_s: float = FOLLOW_TIMEOUT_S, what: str = "condition") -> Any:
    """Call `check` until it returns something truthy (bounded; a readiness poll, not a sleep)."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise TimeoutError(f"{what} not reached after {timeout_s}s (last: {last!r})")


def info(base_url: str) -> dict[str, Any]:
    response = requests.get(f"{base_url}/info", timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_for_version(base_url: str, version: str) -> dict[str, Any]:
    return dict(poll(lambda: (i := info(base_url))["index_version"] == version and i, what=f"serving {version}"))


def search(base_url: str, data: bytes, k: int = 100, timeout: float = 60) -> requests.Response:
    return requests.post(
        f"{base_url}/search", files=[("files", ("q.jpg", data, "image/jpeg"))], params={"k": k}, timeout=timeout
    )


@contextmanager
def served_app(
    name: str, serve_port: int, args: dict[str, Any], options: dict[str, Any] | None = None
) -> Iterator[str]:
    """A Serve application of our own (its own name and route prefix), deleted afterwards."""
    from ray import serve

    from serve_app.app import build_graph
    from serve_app.config import AppArgs

    # Small CPU asks: the session's shared app and this one run side by side on a small machine.
    deployment_options = {
        "Embedder": {"ray_actor_options": {"num_cpus": 0.5}},
        "Searcher": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}},
        **(options or {}),
    }
    serve.run(
        build_graph(AppArgs.model_validate(args), deployment_options),
        name=name,
        route_prefix=f"/{name}",
        blocking=False,
    )
    base_url = f"http://127.0.0.1:{serve_port}/{name}"
    try:
        wait_until_ok(f"{base_url}/healthz")
        yield base_url
    finally:
        serve.delete(name)


def replica_pids(app: str, deployment: str) -> list[int]:
    """Process ids of an application's replicas (found through their named actors, as test_faults.py does)."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    pids = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith(prefix):
            try:
                actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
                pids.append(int(ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)))
            except (ValueError, ray.exceptions.RayActorError):
                continue  # a replica that was just killed may still be listed for a moment
    return pids
