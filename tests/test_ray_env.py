"""serve_app/ray_env.py: the idle-friendly Ray settings, that Ray reads each of them, and who applies them.

The test session's own Ray (tests/conftest.py) keeps Ray's defaults, as the suite CI last passed
with: the real-SIGINT builder test failed in full runs here both with and without these settings
(fixed in that test), and a full run with them applied in conftest has not been made since.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from serve_app import ray_env

REPO_ROOT = Path(__file__).resolve().parents[1]

# Where Ray 2.60 reads each setting, as (module, attribute): a renamed variable in a later Ray would
# silently fall back to the default, so this test reads Ray's own constants under our environment.
RAY_CONSTANTS = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": ("ray.serve._private.constants", "CONTROL_LOOP_INTERVAL_S"),
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": ("ray.serve._private.constants", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"),
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": ("ray._private.log_monitor", "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"),
    "LOG_NAME_UPDATE_INTERVAL_S": ("ray._private.log_monitor", "LOG_NAME_UPDATE_INTERVAL_S"),
    "REPORTER_UPDATE_INTERVAL_MS": ("ray.dashboard.modules.reporter.reporter_consts", "REPORTER_UPDATE_INTERVAL_MS"),
    "EVENT_AGENT_REPORT_INTERVAL_SECONDS": (
        "ray.dashboard.modules.event.event_consts",
        "EVENT_AGENT_REPORT_INTERVAL_SECONDS",
    ),
}


def test_every_setting_has_a_known_reader() -> None:
    assert set(RAY_CONSTANTS) == set(ray_env.IDLE_FRIENDLY)


def test_ray_reads_every_setting_under_our_environment() -> None:
    script = (
        "import importlib, json, sys\n"
        f"table = {RAY_CONSTANTS!r}\n"
        "print(json.dumps({name: getattr(importlib.import_module(m), a) for name, (m, a) in table.items()}))\n"
    )
    environ = {name: value for name, value in os.environ.items() if name not in ray_env.IDLE_FRIENDLY}
    ray_env.apply(environ)
    done = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, check=True)
    read = json.loads(done.stdout.splitlines()[-1])
    for name, value in ray_env.IDLE_FRIENDLY.items():
        assert float(read[name]) == float(value), (name, read[name])


def test_a_value_the_user_set_wins() -> None:
    environ = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1", "PATH": "/bin"}
    added = ray_env.apply(environ)
    assert environ["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.1"
    assert "RAY_SERVE_CONTROL_LOOP_INTERVAL_S" not in added
    assert {name: environ[name] for name in added} == added
    assert set(added) == set(ray_env.IDLE_FRIENDLY) - {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S"}


def test_the_shell_exports_set_the_missing_settings_in_bash() -> None:
    environ = {name: value for name, value in os.environ.items() if name not in ray_env.IDLE_FRIENDLY}
    environ["LOG_NAME_UPDATE_INTERVAL_S"] = "7"
    command = f'eval "$({sys.executable} -m serve_app.ray_env)"; env'
    done = subprocess.run(
        ["bash", "-c", command], env=environ, cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    seen = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert seen["LOG_NAME_UPDATE_INTERVAL_S"] == "7"
    for name, value in ray_env.IDLE_FRIENDLY.items():
        if name != "LOG_NAME_UPDATE_INTERVAL_S":
            assert seen[name] == value


def test_run_sh_exports_the_settings_before_serve_run() -> None:
    text = (REPO_ROOT / "scripts" / "run.sh").read_text()
    applied = text.index('eval "$($PY -m serve_app.ray_env)"')
    assert applied < text.index("exec .venv/bin/serve run")


def test_every_ray_start_on_the_cluster_exports_the_settings_first() -> None:
    raw = yaml.safe_load((REPO_ROOT / "cluster" / "aws.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = (command for command in raw[key] if "ray start" in command)
        assert start.index('eval "$(python -m serve_app.ray_env)"') < start.index("ray start"), key
