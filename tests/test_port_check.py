"""A second service on a taken port: Ray would share it silently (SO_REUSEPORT); scripts/check_port.py refuses."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT
from tests.support import free_port


def write_config(folder: Path, port: int) -> Path:
    config = folder / "serve_config.yaml"
    config.write_text(f"http_options:\n  host: 127.0.0.1\n  port: {port}\napplications: []\n")
    return config


def check_port(config: Path) -> subprocess.CompletedProcess[str]:
    script = REPO_ROOT / "scripts" / "check_port.py"
    return subprocess.run([sys.executable, str(script), str(config)], capture_output=True, text=True, timeout=60)


def test_rays_proxy_port_can_be_bound_again_with_reuseport(serve_port: int) -> None:
    """Ray's behaviour, the reason for the check: a second SO_REUSEPORT listener (a second Ray's proxy) succeeds."""
    with socket.socket() as second:
        second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        second.bind(("127.0.0.1", serve_port))
        second.listen()


def test_check_refuses_the_port_the_running_service_holds(serve_port: int, tmp_path: Path) -> None:
    result = check_port(write_config(tmp_path, serve_port))
    assert result.returncode == 1
    assert f"Port {serve_port} on 127.0.0.1 is already in use" in result.stderr


def test_check_passes_on_a_free_port(tmp_path: Path) -> None:
    result = check_port(write_config(tmp_path, free_port()))
    assert (result.returncode, result.stderr) == (0, "")
