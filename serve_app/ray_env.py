"""Ray settings that keep an idle service idle, set in the environment before Ray starts.

Ray's defaults poll a cluster as if it changed every moment: the Serve controller runs its control
loop every 0.1 s, every handle pushes queue metrics every 0.1 s, the log monitor globs the log folder
every 0.5 s, and the dashboard agent reports every 5 s. On a 2-core VM an idle service took 27% of
a core with Ray's defaults and 17.5% with these (`python -m benchmarks.idle_cpu --ray-defaults`).
None of it serves a request: requests never wait for the controller, only deploys, health checks
and autoscaling do, and those work on scales of seconds (health checks every 10 s, autoscaling looks back 30 s).

What each setting costs:
- a deploy or a replica restart is noticed up to 1 s later (controller loop);
- autoscaling decisions see queue lengths up to 1 s old (metrics export);
- a new worker's log lines reach `serve run`'s console up to 2 s later (log monitor).

These are read once, when each Ray process starts, so they must be in the environment of the
process that starts Ray: `scripts/run.sh` (for `serve run`), `cluster/aws.yaml` (before `ray start`)
and the Serve benchmarks (before `ray.init`). The test session's Ray keeps Ray's defaults
(see tests/test_ray_env.py). A value already in the environment wins, so a user can still set any
of them.

    eval "$(python -m serve_app.ray_env)"     # bash: export the settings not already set
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, MutableMapping

IDLE_FRIENDLY: dict[str, str] = {
    # Serve controller: reconcile deployments once a second instead of ten times.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1.0",
    # Handles and replicas: push queue-length metrics to the controller once a second.
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    # Log monitor: rescan the log folder for new files every 2 s, whatever the number of files
    # (below the threshold, 1000 files by default, it rescans on every 0.5 s pass).
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "2",
    # Dashboard agent: node resource reports every 10 s instead of 5 s.
    "REPORTER_UPDATE_INTERVAL_MS": "10000",
    # Event agent: look for events to send to the dashboard once a second instead of every 0.1 s.
    "EVENT_AGENT_REPORT_INTERVAL_SECONDS": "1",
}


def missing_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The idle-friendly settings `environ` does not set already (a user's own value wins)."""
    return {name: value for name, value in IDLE_FRIENDLY.items() if name not in environ}


def apply(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set the missing settings in `environ` (this process's environment by default); returns them."""
    added = missing_settings(environ)
    environ.update(added)
    return added


def shell_exports(settings: Mapping[str, str]) -> str:
    """`export NAME=value` lines for a POSIX shell's `eval`."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in settings.items())


def main() -> int:
    sys.stdout.write(shell_exports(missing_settings(os.environ)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
