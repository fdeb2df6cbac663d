"""Print "Ready: open http://HOST:PORT" once the service answers /healthz (used by scripts/run.sh).

Runs beside `serve run` and exits on its own: when the service is ready, when the process it
watches has ended, or after a bounded wait.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.request

READY_TIMEOUT_S = 900
POLL_INTERVAL_S = 1.0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("pid", type=int, help="the serve run process; stop watching when it ends")
    args = parser.parse_args()
    url = f"http://{args.host}:{args.port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and alive(args.pid):
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                if response.status == 200:
                    print(f"\nReady: open {url} (Ctrl-C to stop)\n", flush=True)
                    return 0
        except OSError:
            pass
        time.sleep(POLL_INTERVAL_S)
    return 1


if __name__ == "__main__":
    sys.exit(main())
