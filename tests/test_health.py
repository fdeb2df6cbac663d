"""/healthz's rules (serve_app/health.py) on status values shaped like `serve.status()`'s."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import pytest
from ray.serve.schema import DeploymentStatus, ReplicaState

from serve_app.health import ServeMessageLog, health_report

SERVING = {"index_version": "v7"}


@dataclass
class Overview:  # the fields of ray.serve.schema.DeploymentStatusOverview that health.py reads
    status: str = "HEALTHY"
    replica_states: dict = field(default_factory=lambda: {"RUNNING": 2})
    message: str = ""


def test_all_replicas_running_is_ok() -> None:
    status, body = health_report({"Searcher": Overview(), "Ingress": Overview(replica_states={"RUNNING": 1})}, SERVING)
    assert status == 200
    assert body["status"] == "ok" and body["index_version"] == "v7"
    assert body["deployments"]["Searcher"] == {"status": "HEALTHY", "healthy_replicas": 2, "replicas": 2}


def test_a_replica_being_replaced_is_degraded_with_counts() -> None:
    overview = Overview(replica_states={"RUNNING": 1, "STARTING": 1})
    status, body = health_report({"Searcher": overview, "Ingress": Overview(replica_states={"RUNNING": 1})}, SERVING)
    assert status == 200 and body["status"] == "degraded"
    assert body["deployments"]["Searcher"]["healthy_replicas"] == 1
    assert body["deployments"]["Searcher"]["replicas"] == 2


def test_crash_looping_deployment_is_degraded_and_serves_message_is_logged_not_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    message = "A replica's constructor failed: ArtifactError: cannot read /srv/secret-bucket/index/manifest.json"
    looping = Overview(
        status=DeploymentStatus.UNHEALTHY,
        replica_states={ReplicaState.RUNNING: 1, ReplicaState.STARTING: 1},
        message=message,
    )
    messages = ServeMessageLog()
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        for _ in range(3):  # polled again and again: logged once
            status, body = health_report({"Searcher": looping}, SERVING, messages)
    assert status == 200 and body["status"] == "degraded"
    assert body["deployments"]["Searcher"] == {"status": "UNHEALTHY", "healthy_replicas": 1, "replicas": 2}
    assert "constructor" not in json.dumps(body) and "/srv" not in json.dumps(body)
    assert [record.getMessage() for record in caplog.records if message in record.getMessage()] == [
        f"deployment Searcher is UNHEALTHY: {message}"
    ]


def test_stopping_replicas_do_not_count_as_missing() -> None:
    status, body = health_report({"Searcher": Overview(replica_states={"RUNNING": 2, "STOPPING": 1})}, SERVING)
    assert (status, body["status"]) == (200, "ok")


def test_a_deployment_without_running_replicas_is_unavailable() -> None:
    down = Overview(status="UNHEALTHY", replica_states={"STARTING": 1})
    status, body = health_report({"Embedder": down, "Searcher": Overview()}, SERVING)
    assert status == 503 and body["status"] == "unavailable"
