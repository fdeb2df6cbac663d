"""Retention never breaks a replica: five rebuilds while serving (old versions deleted), then a killed
Searcher and a killed Ingress replica both come back on CURRENT and answer. Also: /healthz tells the
truth about a deployment short of replicas, and a moved collection is served through `images`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import requests

from tests.conftest import REQUEST_TIMEOUT_S
from tests.living import (
    RELOAD_INTERVAL_S,
    build,
    current_version,
    manifest_of,
    poll,
    replica_pids,
    search,
    served_app,
    wait_for_version,
)
from tests.support import write_image_folder

REBUILDS = 5
# Retention as tight as the builder allows: CURRENT and the version before it, nothing kept for time.
TIGHT_RETENTION = ("--retention-hours", "0", "--keep-versions", "2")
RECOVERY_TIMEOUT_S = 180


def app_args(model: Path, out: Path, **extra: Any) -> dict[str, Any]:
    return {
        "model": str(model),
        "index": str(out),
        "embedder": {"num_threads": 1},
        "reload_interval_s": RELOAD_INTERVAL_S,
        "request_timeout_s": REQUEST_TIMEOUT_S,
        "health_status_ttl_s": 0,
        **extra,
    }


def healthz(base_url: str) -> dict[str, Any]:
    try:
        response = requests.get(f"{base_url}/healthz", timeout=10)
        return dict(response.json())
    except (requests.RequestException, ValueError):
        return {}  # the Ingress itself is being replaced


def test_five_rebuilds_then_killed_replicas_come_back(serve_port: int, tiny_model_dir: Path, tmp_path: Path) -> None:
    collection, out = tmp_path / "collection", tmp_path / "index"
    write_image_folder(collection, 6)
    first = build(collection, out, tiny_model_dir, *TIGHT_RETENTION)
    with served_app("retention", serve_port, app_args(tiny_model_dir, out)) as base_url:
        published = [first]
        for round_ in range(REBUILDS):
            write_image_folder(collection / f"round{round_}", 1, start_seed=700 + round_)
            published.append(build(collection, out, tiny_model_dir, *TIGHT_RETENTION))
            wait_for_version(base_url, published[-1])
        latest = published[-1]
        # Retention deleted what the running app started on: a pinned replica could not come back.
        kept = {p.name for p in (out / "versions").iterdir()}
        assert len(kept) == 2 and latest in kept and first not in kept, (kept, published)

        searcher_pid, ingress_pid = replica_pids("retention", "Searcher")[0], replica_pids("retention", "Ingress")[0]
        os.kill(searcher_pid, signal.SIGKILL)
        os.kill(ingress_pid, signal.SIGKILL)

        def recovered() -> dict[str, Any] | None:
            health = healthz(base_url)
            searchers = replica_pids("retention", "Searcher")
            ingresses = replica_pids("retention", "Ingress")
            back = (
                health.get("status") == "ok"
                and len(searchers) == 2
                and searcher_pid not in searchers
                and ingresses
                and ingress_pid not in ingresses
            )
            return health if back else None

        health = poll(recovered, RECOVERY_TIMEOUT_S, "both killed replicas replaced and healthy")
        assert health["index_version"] == latest
        assert health["deployments"]["Searcher"]["healthy_replicas"] == 2

        query = next((collection / "round4").rglob("img_*")).read_bytes()
        expected_ids = {r["id"] for r in manifest_of(out, latest)["records"]}
        for _ in range(8):  # both Searcher replicas, the new one included, get some of these
            response = search(base_url, query)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["index_version"] == latest
            assert {m["id"] for m in body["results"][0]["matches"]} == expected_ids
            assert body["results"][0]["matches"][0]["path"].startswith("round4/")


def test_healthz_reports_a_deployment_short_of_replicas_as_degraded(
    serve_port: int, index_dir: Path, tiny_model_dir: Path
) -> None:
    """Two Searcher replicas configured, at most one per node on this one-node cluster: one can never start."""
    from ray import serve

    from serve_app.app import build_graph
    from serve_app.config import AppArgs

    args = AppArgs.model_validate(app_args(tiny_model_dir, index_dir))
    options = {
        "Embedder": {"ray_actor_options": {"num_cpus": 0.5}},
        "Searcher": {"num_replicas": 2, "max_replicas_per_node": 1, "ray_actor_options": {"num_cpus": 0.25}},
    }
    # serve.run waits for the application to be fully RUNNING, which this one never is: deploy from a
    # thread and watch the routes instead (the thread ends when the application is deleted).
    deploying = threading.Thread(
        target=lambda: _run_ignoring_deletion(build_graph(args, options)), name="deploy-short", daemon=True
    )
    deploying.start()
    base_url = f"http://127.0.0.1:{serve_port}/short"
    try:
        health = poll(lambda: healthz(base_url).get("deployments") and healthz(base_url), what="/short/healthz")
        assert health["status"] == "degraded", health
        assert health["deployments"]["Searcher"]["healthy_replicas"] == 1
        assert health["deployments"]["Searcher"]["replicas"] == 2
        assert health["deployments"]["Embedder"]["healthy_replicas"] == 1
        # Degraded still serves.
        response = requests.get(f"{base_url}/info", timeout=30)
        assert response.status_code == 200
    finally:
        serve.delete("short")
        deploying.join(timeout=60)


def _run_ignoring_deletion(app: Any) -> None:
    from ray import serve

    # It raises once the test deletes the application, which never became RUNNING.
    with contextlib.suppress(Exception):
        serve.run(app, name="short", route_prefix="/short", blocking=False)


def test_moved_collection_is_served_through_the_images_setting(
    serve_port: int, tiny_model_dir: Path, tmp_path: Path
) -> None:
    built_at, moved_to, out = tmp_path / "built-here", tmp_path / "moved-there", tmp_path / "index"
    paths = write_image_folder(built_at, 5)
    build(built_at, out, tiny_model_dir)
    shutil.move(built_at, moved_to)
    records = manifest_of(out, current_version(out))["records"]
    args = app_args(tiny_model_dir, out, images=str(moved_to))
    with served_app("moved", serve_port, args) as base_url:
        for record in records:
            response = requests.get(f"{base_url}/images/{record['id']}", timeout=30)
            assert response.status_code == 200, response.text
            assert response.content == (moved_to / record["key"]).read_bytes()
        thumb = requests.get(f"{base_url}/images/{records[0]['id']}", params={"size": 128}, timeout=30)
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert not any(path.exists() for path in paths)
