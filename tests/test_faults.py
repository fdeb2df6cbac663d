"""Overload and faults against real processes: backpressure, deadlines, killed replicas, killed builds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import ray
import requests

from tests import images
from tests.conftest import APP_NAME, REQUEST_TIMEOUT_S, wait_until_ok
from tests.support import write_image_folder

LOAD_DEADLINE_S = 90


def post_one(url: str, data: bytes, timeout: float = 60) -> requests.Response:
    return requests.post(f"{url}/search", files=[("files", ("q.jpg", data, "image/jpeg"))], timeout=timeout)


def replica_actors(app: str, deployment: str) -> list[Any]:
    names = ray.util.list_named_actors(all_namespaces=True)
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in names if a["name"].startswith(prefix)]


def replica_pid(actor: Any) -> int:
    return int(ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30))


def record(artifact_dir: Path, name: str, values: dict[str, Any]) -> None:
    path = artifact_dir / "fault-measurements.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = values
    path.write_text(json.dumps(data, indent=2))
    print(name, values)


def load_while(url: str, payload: bytes, action_after: int, action: Any, after_action: int) -> list[tuple[float, int]]:
    """Send requests from 4 threads; run `action` after `action_after` answers; stop `after_action` answers later."""
    outcomes: list[tuple[float, int]] = []
    acted_at: list[float] = []
    deadline = time.monotonic() + LOAD_DEADLINE_S

    def client() -> None:
        while time.monotonic() < deadline:
            if acted_at and sum(1 for t, _ in outcomes if t > acted_at[0]) >= after_action:
                return
            try:
                status = post_one(url, payload, timeout=REQUEST_TIMEOUT_S + 15).status_code
            except requests.RequestException:
                status = -1  # a hang or a dropped connection: counted as a failure
            outcomes.append((time.monotonic(), status))
            if len(outcomes) >= action_after and not acted_at:
                acted_at.append(time.monotonic())
                action()

    with ThreadPoolExecutor(max_workers=4) as pool:
        for future in [pool.submit(client) for _ in range(4)]:
            future.result()
    return outcomes


def test_killed_embedder_is_replaced_and_in_flight_requests_get_503(serve_base_url: str, artifact_dir: Path) -> None:
    (embedder,) = replica_actors(APP_NAME, "Embedder")
    pid = replica_pid(embedder)
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    outcomes = load_while(serve_base_url, images.jpeg(11), action_after=8, action=kill, after_action=30)
    statuses = [status for _, status in outcomes]
    assert set(statuses) <= {200, 503}, statuses
    after = [(t, s) for t, s in outcomes if t > killed_at[0]]
    assert after[-1][1] == 200
    first_ok_after_failure = next(
        (t for t, s in after if s == 200 and t > max((t2 for t2, s2 in after if s2 != 200), default=0)), None
    )
    assert first_ok_after_failure is not None
    new_pid = replica_pid(replica_actors(APP_NAME, "Embedder")[0])
    assert new_pid != pid
    record(
        artifact_dir,
        "embedder_kill",
        {
            "requests": len(statuses),
            "503s": statuses.count(503),
            "recovery_s": round(first_ok_after_failure - killed_at[0], 2),
        },
    )


def test_killed_searcher_replica_fails_no_request(serve_base_url: str, artifact_dir: Path) -> None:
    searchers = replica_actors(APP_NAME, "Searcher")
    assert len(searchers) == 2
    pid = replica_pid(searchers[0])
    outcomes = load_while(
        serve_base_url, images.jpeg(12), action_after=6, action=lambda: os.kill(pid, signal.SIGKILL), after_action=30
    )
    statuses = [status for _, status in outcomes]
    assert statuses.count(200) == len(statuses), statuses
    record(artifact_dir, "searcher_kill", {"requests": len(statuses), "failed": len(statuses) - statuses.count(200)})


def test_client_cannot_lift_the_request_deadline(serve_base_url: str) -> None:
    """A slow upload that asks Serve to disable its timeout still gets our 503 at the deadline."""
    host, port = serve_base_url.removeprefix("http://").split(":")
    boundary = "slowboundary"
    head = (
        f"POST /search HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: 100000\r\nx-request-timeout-seconds: 0\r\n\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="slow.jpg"\r\n\r\n'
    ).encode()
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=REQUEST_TIMEOUT_S + 30) as sock:
        sock.sendall(head + b"\xff\xd8")  # then nothing: the body never completes
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    elapsed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 503"), reply[:200]
    assert b'"timeout"' in reply
    assert REQUEST_TIMEOUT_S - 1 <= elapsed <= REQUEST_TIMEOUT_S + 20


def test_overload_gets_fast_503_with_retry_after(serve_port: int, index_dir: Path, tiny_model_dir: Path) -> None:
    from ray import serve

    from serve_app.app import build_graph
    from serve_app.config import AppArgs

    args = AppArgs.model_validate({"model": str(tiny_model_dir), "index": str(index_dir)})
    tight = {
        "Embedder": {
            "max_ongoing_requests": 1,
            "max_queued_requests": 4,
            "user_config": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0},
        },
        "Searcher": {"num_replicas": 1},
    }
    serve.run(build_graph(args, tight), name="overload", route_prefix="/overload", blocking=False)
    base = f"http://127.0.0.1:{serve_port}/overload"
    wait_until_ok(f"{base}/healthz")
    payload = [("files", ("q.jpg", images.jpeg(1, (200, 150)), "image/jpeg"))]
    try:
        with ThreadPoolExecutor(max_workers=24) as pool:
            responses = list(pool.map(lambda _: requests.post(f"{base}/search", files=payload, timeout=60), range(48)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}, statuses
        assert 503 in statuses and 200 in statuses, statuses
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.json()["error"]["code"] == "overloaded"
        assert busy.headers["retry-after"] == "1"
    finally:
        serve.delete("overload")


def test_sigkilled_build_leaves_previous_index_serveable(tmp_path: Path, tiny_model_dir: Path) -> None:
    from image_search.artifact import load_artifact
    from image_search.storage import LocalStore

    images_dir = tmp_path / "images"
    write_image_folder(images_dir, 300)
    out = tmp_path / "index"
    command = [
        sys.executable,
        "-m",
        "index_builder",
        "--images",
        str(images_dir),
        "--out",
        str(out),
        "--model",
        str(tiny_model_dir),
        "--batch-size",
        "8",
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    before = (out / "CURRENT").read_text()

    # --full: an unchanged collection would otherwise have nothing to embed (and publish nothing).
    command.append("--full")
    builder = subprocess.Popen(command, stderr=subprocess.PIPE)
    assert builder.stderr is not None
    # Kill it once its progress bar shows images being embedded (well before it can publish). Raw
    # reads: tqdm redraws with \r and ends its line only when done, so readline() would wait for the end.
    seen = b""
    while b"img/s" not in seen:
        chunk = os.read(builder.stderr.fileno(), 4096)
        assert chunk, seen.decode(errors="replace")
        seen += chunk
    assert b"300/300" not in seen
    builder.send_signal(signal.SIGKILL)
    builder.wait(timeout=60)
    assert builder.returncode == -signal.SIGKILL
    assert (out / "CURRENT").read_text() == before
    assert load_artifact(LocalStore(out)).manifest.count == 300

    subprocess.run(command, check=True, capture_output=True, timeout=300)
    assert (out / "CURRENT").read_text() != before
    assert load_artifact(LocalStore(out)).manifest.count == 300


@pytest.mark.parametrize(
    "damage", ["truncated_index", "garbage_manifest", "missing_index", "flipped_byte", "bad_pointer"]
)
def test_damaged_artifact_is_refused_before_start(
    tmp_path: Path, index_dir: Path, tiny_model_dir: Path, damage: str
) -> None:
    import shutil

    from image_search.errors import ArtifactError
    from serve_app.app import build_app

    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    version = (copy / "CURRENT").read_text().strip()
    folder = copy / "versions" / version
    index_file = folder / "index.faiss"
    if damage == "truncated_index":
        index_file.write_bytes(index_file.read_bytes()[:100])
    elif damage == "garbage_manifest":
        (folder / "manifest.json").write_text("{not json")
    elif damage == "missing_index":
        index_file.unlink()
    elif damage == "flipped_byte":
        data = bytearray(index_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        index_file.write_bytes(bytes(data))
    elif damage == "bad_pointer":
        (copy / "CURRENT").write_text("../../etc\n")
    expected = {
        "truncated_index": "checksum",
        "garbage_manifest": "not valid JSON",
        "missing_index": "incomplete",
        "flipped_byte": "checksum",
        "bad_pointer": "invalid version name",
    }[damage]
    with pytest.raises(ArtifactError, match=expected):
        build_app({"model": str(tiny_model_dir), "index": str(copy)})  # type: ignore[arg-type]


def test_index_of_another_dimension_is_refused(tmp_path: Path, index_dir: Path) -> None:
    from image_search.errors import ArtifactError
    from serve_app.app import build_app
    from tests.support import TINY, make_clip_checkpoint

    other = make_clip_checkpoint(tmp_path / "wide", {**TINY, "projection_dim": 48})
    with pytest.raises(ArtifactError, match=r"32-d vectors from model .* makes 48-d vectors"):
        build_app({"model": str(other), "index": str(index_dir)})  # type: ignore[arg-type]


def test_index_of_another_model_of_same_dimension_fails_the_deploy(
    serve_port: int, tmp_path: Path, index_dir: Path
) -> None:
    from ray import serve

    from serve_app.app import build_app
    from tests.support import make_clip_checkpoint

    other = make_clip_checkpoint(tmp_path / "other", seed=1)
    app = build_app({"model": str(other), "index": str(index_dir)})  # type: ignore[arg-type]
    try:
        with pytest.raises(RuntimeError, match="Deploying application mismatch failed"):
            serve.run(app, name="mismatch", route_prefix="/mismatch")
        # The reason reaches the operator through `serve status`.
        message = serve.status().applications["mismatch"].deployments["Ingress"].message
        assert "built with model" in message and "fingerprint" in message, message
    finally:
        serve.delete("mismatch")
