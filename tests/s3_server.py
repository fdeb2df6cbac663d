"""A real S3-protocol server on 127.0.0.1 for tests: moto's server mode in a thread of this process.

`moto_s3()` starts it on a free port (the OS picks it: no race between choosing and binding),
waits until it answers an S3 call (polling, bounded), and yields the environment a boto3 client
needs to reach it: `AWS_ENDPOINT_URL` (honoured by boto3 itself) and fake credentials and region.
Processes that should talk to it (Ray workers, Serve replicas) need that environment too: pass
`S3Server.env` as a runtime_env's `env_vars`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    env: dict[str, str]

    def client(self) -> Any:
        """A boto3 S3 client for this server, independent of the process environment."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.env["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )


def fake_aws_env(endpoint_url: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        # Never fall through to the EC2 instance metadata service (slow timeouts off EC2).
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def wait_until_ready(server: S3Server, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll a real S3 call until the server answers (a readiness check, not a sleep)."""
    client = server.client()
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            client.list_buckets()
            return
        except Exception as exc:  # connection refused while it binds, and the like
            last = exc
            time.sleep(0.05)
    raise TimeoutError(f"moto S3 server at {server.endpoint_url} not ready after {timeout_s}s: {last}")


@contextmanager
def moto_s3() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        server = S3Server(endpoint_url=endpoint, env=fake_aws_env(endpoint))
        wait_until_ready(server)
        yield server
    finally:
        moto.stop()


def upload_folder(client: Any, folder: Path, bucket: str, prefix: str) -> list[str]:
    """Upload every file under `folder` to s3://bucket/prefix/<relative path>; returns the keys."""
    keys = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(folder).as_posix()}"
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        keys.append(key)
    return keys
