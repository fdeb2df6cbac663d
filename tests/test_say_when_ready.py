"""scripts/say_when_ready.py (run.sh's Ready line): it waits for slow answers instead of dropping
the connection (which Serve logs as "Client ... disconnected"), and says Ready again at the end."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.conftest import REPO_ROOT

SLOW_ANSWER_S = 6.0  # longer than the poll's old 5 s timeout


def test_a_slow_healthz_is_waited_for_and_ready_is_said_last() -> None:
    answered: list[int] = []
    dropped: list[str] = []

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status = 503 if not answered else 200
            time.sleep(SLOW_ANSWER_S)
            body = b'{"status": "ok"}' * 4096  # a body the client must read whole
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                answered.append(status)
            except OSError as exc:
                dropped.append(repr(exc))

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        script = str(REPO_ROOT / "scripts" / "say_when_ready.py")
        result = subprocess.run(
            [sys.executable, script, "127.0.0.1", str(port), str(os.getpid()), "--repeat-after", "0.2"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line]
    assert lines == [f"Ready: open http://127.0.0.1:{port} (Ctrl-C to stop)"] * 2
    assert answered == [503, 200] and dropped == []
