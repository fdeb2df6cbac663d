"""Print "Ready: open http://HOST:PORT" once the service answers /healthz (used by scripts/run.sh).

Runs beside `serve run` and exits on its own: when the service is ready, when the process it
watches has ended, or after a bounded wait.

Each poll waits for the whole answer: a client that gives up mid-request (the service may take a
few seconds to answer while its replicas start) makes Serve log "Client for request ...
disconnected, cancelling request", which reads like an error. Serve and Ray keep printing their
start-up lines for a few seconds after the first healthy answer, burying the Ready line: it is
printed again after them, so that it is the last line a user sees.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.request

READY_TIMEOUT_S = 900
POLL_INTERVAL_S = 1.0
# How long one poll waits for its answer: long enough that we never leave before the service answers.
ANSWER_TIMEOUT_S = 60.0
# When to say it again: after the burst of Serve's "deployed"/replica log lines that follows readiness.
REPEAT_AFTER_S = 5.0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def healthy(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=timeout_s) as response:
            response.read()  # the whole answer, then close: never a connection dropped mid-response
            return response.status == 200
    except OSError:  # refused while starting, a 503 (HTTPError), a timeout
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("pid", type=int, help="the serve run process; stop watching when it ends")
    parser.add_argument("--repeat-after", type=float, default=REPEAT_AFTER_S, help="seconds; 0: say it once")
    args = parser.parse_args(argv)
    url = f"http://{args.host}:{args.port}"
    line = f"\nReady: open {url} (Ctrl-C to stop)\n"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and alive(args.pid):
        started = time.monotonic()
        if healthy(url, ANSWER_TIMEOUT_S):
            print(line, flush=True)
            if args.repeat_after > 0:
                time.sleep(args.repeat_after)  # not synchronisation: only after the others' lines
                if alive(args.pid):
                    print(line, flush=True)
            return 0
        time.sleep(max(0.0, POLL_INTERVAL_S - (time.monotonic() - started)))
    return 1


if __name__ == "__main__":
    sys.exit(main())
