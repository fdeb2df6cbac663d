"""Refuse to start a second service on a port that is already taken (used by scripts/run.sh).

Ray's HTTP proxy binds its port with SO_REUSEPORT, so a second `serve run` on one machine (which
starts a second local Ray) binds the same 127.0.0.1:8000 without any error, and the kernel then
splits connections between the two services. This check binds the port the way an ordinary
server does (no SO_REUSEPORT) and fails loudly when anything listens there already.

    python scripts/check_port.py [serve_config.yaml]   -> exit 0 when free, 1 (with a message) when taken
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import yaml

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def configured_address(config_path: Path) -> tuple[str, int]:
    """The http_options host/port of a Serve config file (Serve's defaults when absent)."""
    options = (yaml.safe_load(config_path.read_text()) or {}).get("http_options") or {}
    host = str(options.get("host", DEFAULT_HOST))
    # 0.0.0.0 listens everywhere; a service on any local address collides with it on loopback too.
    return ("127.0.0.1" if host in ("0.0.0.0", "::") else host), int(options.get("port", DEFAULT_PORT))


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: connections of an earlier run left in TIME_WAIT do not count; a listener does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def main(argv: list[str]) -> int:
    config = Path(argv[0] if argv else "serve_config.yaml")
    host, port = configured_address(config)
    if port_in_use(host, port):
        print(
            f"Port {port} on {host} is already in use; is the service running already (`serve run`)?\n"
            f"A second one would silently share the port with it (Ray binds with SO_REUSEPORT) and the two\n"
            f"would answer requests alternately. Stop the other one first (Ctrl-C, or `ray stop`), or set\n"
            f"another http_options.port in {config}. A new index needs no restart: the running service\n"
            f"picks up every published version by itself (see README, 'Keeping the index up to date').",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
