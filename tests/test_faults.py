"""Overload and faults against real processes: backpressure, deadlines, killed replicas, killed builds."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import ray
import requests

from serve_app.config import AppArgs
from tests import images
from tests.conftest import APP_NAME, REQUEST_TIMEOUT_S, wait_until_ok
from tests.living import poll
from tests.support import post_search, write_image_folder

LOAD_DEADLINE_S = 90


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
    """Send from 4 threads; run `action` once after `action_after` answers; stop `after_action` answers later."""
    outcomes: list[tuple[float, int]] = []
    acted_at: list[float] = []
    lock = threading.Lock()  # one decision to act, taken by exactly one thread
    deadline = time.monotonic() + LOAD_DEADLINE_S

    def client() -> None:
        while time.monotonic() < deadline:
            with lock:
                if acted_at and sum(1 for t, _ in outcomes if t > acted_at[0]) >= after_action:
                    return
            try:
                status = post_search(url, [("q.jpg", payload)], timeout=REQUEST_TIMEOUT_S + 15).status_code
            except requests.RequestException:
                status = -1  # a hang or a dropped connection: counted as a failure
            with lock:
                outcomes.append((time.monotonic(), status))
                act = len(outcomes) >= action_after and not acted_at
                if act:
                    acted_at.append(time.monotonic())
            if act:
                action()

    with ThreadPoolExecutor(max_workers=4) as pool:
        for future in [pool.submit(client) for _ in range(4)]:
            future.result()
    return outcomes


def test_killed_embedder_is_replaced_and_in_flight_requests_get_503(
    serve_base_url: str, app_args: AppArgs, artifact_dir: Path
) -> None:
    """A request held inside the Embedder (gated: it waits 10 s for company) when the replica is killed."""
    from ray import serve

    from serve_app.app import build_graph

    def deploy(batching: dict) -> None:
        serve.run(build_graph(app_args, {"Embedder": {"user_config": batching}}), name=APP_NAME, route_prefix="/")

    deploy({"max_batch_size": 2, "batch_wait_timeout_s": 10})
    try:
        embedder = serve.get_deployment_handle("Embedder", app_name=APP_NAME)
        (actor,) = replica_actors(APP_NAME, "Embedder")
        pid = replica_pid(actor)
        with ThreadPoolExecutor(max_workers=1) as pool:
            in_flight = pool.submit(post_search, serve_base_url, [("q.jpg", images.jpeg(11))])
            poll(lambda: embedder.queued_requests.remote().result() == 1, 60, "a request waiting in the Embedder")
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            answer = in_flight.result(timeout=REQUEST_TIMEOUT_S + 30)
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "unavailable" and answer.headers["retry-after"] == "1"

        def answered() -> bool:
            return post_search(serve_base_url, [("q.jpg", images.jpeg(11))]).status_code == 200

        poll(answered, 120, "an answer from a replacement Embedder")
        recovery_s = time.monotonic() - killed_at
        (replacement,) = replica_actors(APP_NAME, "Embedder")
        assert replica_pid(replacement) != pid
    finally:
        deploy({})
    record(artifact_dir, "embedder_kill", {"in_flight_status": answer.status_code, "recovery_s": round(recovery_s, 2)})


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
    payload = [("q.jpg", images.jpeg(1, (200, 150)))]
    try:
        with ThreadPoolExecutor(max_workers=24) as pool:
            responses = list(pool.map(lambda _: post_search(base, payload), range(48)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}, statuses
        assert 503 in statuses and 200 in statuses, statuses
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.json()["error"]["code"] == "overloaded"
        assert busy.headers["retry-after"] == "1"
    finally:
        serve.delete("overload")


def read_progress(stream: Any) -> Any:
    """(done, total) pairs from the builder's progress bar (unit "img") on `stream`; tqdm redraws with \\r."""
    text = ""
    while True:
        char = stream.read(1)
        if not char:
            return
        if char in "\r\n":
            match = re.search(r"(\d+)/(\d+) \[.*img", text)
            if match:
                yield int(match.group(1)), int(match.group(2))
            text = ""
        else:
            text += char


def test_sigkilled_build_leaves_previous_index_serveable(tmp_path: Path, tiny_model_dir: Path) -> None:
    from image_search.artifact import load_artifact
    from image_search.storage import LocalStore

    images_dir = tmp_path / "images"
    write_image_folder(images_dir, 40)
    out = tmp_path / "index"
    command = [sys.executable, "-m", "index_builder", "--images", str(images_dir), "--out", str(out),
               "--model", str(tiny_model_dir), "--batch-size", "8"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    before = (out / "CURRENT").read_text()
    write_image_folder(images_dir / "more", 160, start_seed=1000)  # the next build has 160 images to embed

    builder = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert builder.stderr is not None
    # Killed once more than half of its images are embedded: mid-build, with vectors in memory.
    progress = next((done, total) for done, total in read_progress(builder.stderr) if total and done * 2 > total)
    builder.send_signal(signal.SIGKILL)
    builder.wait(timeout=60)
    assert builder.returncode == -signal.SIGKILL
    assert progress[0] < progress[1]  # it had not finished embedding
    assert (out / "CURRENT").read_text() == before
    assert load_artifact(LocalStore(out)).manifest.count == 40

    subprocess.run(command, check=True, capture_output=True, timeout=300)
    assert (out / "CURRENT").read_text() != before
    assert load_artifact(LocalStore(out)).manifest.count == 200


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
    (segment,) = json.loads((folder / "version.json").read_text())["segments"]
    index_file = copy / "segments" / segment["name"] / "index.faiss"
    if damage == "truncated_index":
        index_file.write_bytes(index_file.read_bytes()[:100])
    elif damage == "garbage_manifest":
        (folder / "version.json").write_text("{not json")
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


def ingress_log_text() -> str:
    """This session's Ingress replica logs (Serve writes one file per replica)."""
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return "".join(
        path.read_text(errors="replace") for path in (session / "logs" / "serve").glob(f"replica_{APP_NAME}_Ingress_*")
    )


def test_a_client_that_leaves_mid_upload_is_logged_in_one_line_not_as_a_500(serve_base_url: str) -> None:
    """Half a multipart body, then the socket closes: one "client closed" line, no traceback, no 500."""
    host, port = serve_base_url.removeprefix("http://").split(":")
    boundary = "halfboundary"
    head = (
        f"POST /search HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: 200000\r\n\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="half.jpg"\r\n\r\n'
    ).encode()
    (ingress,) = replica_actors(APP_NAME, "Ingress")
    before = ingress_log_text()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + images.jpeg(3)[:50_000])  # about a quarter of the declared body
        # Close only once the Ingress is reading this body (else the proxy drops it before routing).
        poll(
            lambda: ray.get(ingress.get_num_ongoing_requests.remote(), timeout=30) >= 1,
            timeout_s=60,
            what="the Ingress reading the upload",
        )
    poll(
        lambda: ingress_log_text().count("client closed the connection") > before.count("client closed the connection"),
        timeout_s=60,
        what="the Ingress logging the closed connection",
    )
    after = ingress_log_text()
    for marker in ("ClientDisconnect", "unexpected error while answering a request"):
        assert after.count(marker) == before.count(marker), marker


def test_healthz_notices_a_killed_searcher_replica_within_the_health_check_period(serve_base_url: str) -> None:
    from serve_app.app import HEALTH_CHECK_PERIOD_S

    def health() -> str:
        return str(requests.get(f"{serve_base_url}/healthz", timeout=30).json()["status"])

    poll(lambda: health() == "ok", timeout_s=120, what="/healthz ok before the kill")
    pid = replica_pid(replica_actors(APP_NAME, "Searcher")[0])
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    poll(lambda: health() != "ok", timeout_s=30, what="/healthz noticing the killed replica")
    noticed_s = time.monotonic() - killed_at
    # The health check period, the status cache (1 s) and Serve's controller loop, with slack for 2 busy cores.
    assert noticed_s <= HEALTH_CHECK_PERIOD_S + 1.0 + 2.5, noticed_s
    poll(lambda: health() == "ok", timeout_s=120, what="/healthz ok again once the replica is replaced")
