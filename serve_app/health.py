"""What `/healthz` says: each deployment's healthy replicas against the replicas Serve is keeping.

Built from `serve.status()` (Ray's public status API, the same data as `serve status`): for each
deployment its status (HEALTHY, UPDATING, UNHEALTHY, ...) and how many replicas are in each
state. A replica that died and is being replaced shows as STARTING beside the RUNNING ones; a
replica that crash-loops keeps the deployment UNHEALTHY (trigger REPLICA_STARTUP_FAILED). Serve's
message (since Ray 2.x it carries replica constructor exceptions: paths, bucket names, tracebacks)
is logged, once per distinct message, and never answered: anyone may call /healthz, so it shows
states and counts only. Stopping replicas are leaving on purpose and do not count.

- "ok": every deployment HEALTHY with all its replicas running.
- "degraded": answering, but some deployment has fewer running replicas than Serve keeps, or is
  not HEALTHY (HTTP 200: it still serves, a load balancer should keep sending traffic).
- "unavailable": some deployment has no running replica at all (HTTP 503).

The rules are pure (the status arrives as plain values) and unit-tested without Ray.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger("ray.serve")

Health = Literal["ok", "degraded", "unavailable"]
LEAVING_STATES = frozenset({"STOPPING", "STOPPED"})


@dataclass(frozen=True)
class DeploymentHealth:
    name: str
    status: str
    running: int
    replicas: int  # replicas Serve keeps (every state but stopping)
    message: str

    @property
    def health(self) -> Health:
        if self.running == 0:
            return "unavailable"
        if self.status != "HEALTHY" or self.running < self.replicas:
            return "degraded"
        return "ok"

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "healthy_replicas": self.running, "replicas": self.replicas}


def _text(value: Any) -> str:
    """Serve's enums are str subclasses; `.value` gives the plain name either way."""
    return str(getattr(value, "value", value))


def deployment_health(name: str, overview: Any) -> DeploymentHealth:
    """One deployment from a `DeploymentStatusOverview` (status, replica_states, message)."""
    states = {_text(state): int(count) for state, count in dict(overview.replica_states).items()}
    return DeploymentHealth(
        name=name,
        status=_text(overview.status),
        running=states.get("RUNNING", 0),
        replicas=sum(count for state, count in states.items() if state not in LEAVING_STATES),
        message=str(overview.message or "")[:500],
    )


def overall(deployments: list[DeploymentHealth]) -> Health:
    healths = {item.health for item in deployments}
    if not deployments or "unavailable" in healths:
        return "unavailable"
    return "degraded" if "degraded" in healths else "ok"


class ServeMessageLog:
    """Logs each deployment's Serve message when it changes (a load balancer polls /healthz every
    few seconds: the same message is not logged on every poll)."""

    def __init__(self) -> None:
        self.last: dict[str, str] = {}

    def log(self, items: list[DeploymentHealth]) -> None:
        for item in items:
            if item.message and self.last.get(item.name) != item.message:
                logger.warning("deployment %s is %s: %s", item.name, item.status, item.message)
            self.last[item.name] = item.message


def health_report(
    deployments: Mapping[str, Any], serving: Mapping[str, Any], messages: ServeMessageLog | None = None
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) from an application's deployments' status overviews; their messages
    go to `messages` (the log), never into the body."""
    items = [deployment_health(name, overview) for name, overview in sorted(deployments.items())]
    if messages is not None:
        messages.log(items)
    health = overall(items)
    body = {"status": health, **serving, "deployments": {item.name: item.to_dict() for item in items}}
    return (503 if health == "unavailable" else 200), body


def unknown_report(reason: str, serving: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    """When Serve's status cannot be read: we are answering, but cannot vouch for the rest."""
    return 200, {"status": "degraded", **serving, "reason": reason}


class StatusCache:
    """This application's deployments from `serve.status()`, read at most every `ttl_s`.

    Each read is a round trip to Serve's controller; a load balancer polling /healthz must not turn
    into controller load. Runs the blocking call off the event loop.
    """

    def __init__(self, app_name: str, ttl_s: float) -> None:
        self.app_name = app_name
        self.ttl_s = ttl_s
        self.value: Mapping[str, Any] | None = None
        self.read_at = float("-inf")

    async def deployments(self) -> Mapping[str, Any]:
        now = time.monotonic()
        if self.value is None or now - self.read_at >= self.ttl_s:
            self.value = await asyncio.to_thread(self._read)
            self.read_at = now
        return self.value

    def _read(self) -> Mapping[str, Any]:
        from ray import serve

        app = serve.status().applications.get(self.app_name)
        if app is None:
            raise LookupError(f"Serve does not know the application {self.app_name!r}")
        return dict(app.deployments)
