"""The index root's write lock: one committer at a time, on a folder (flock) and on S3 (conditional PUTs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from image_search.commit_lock import LEASE_KEY, LockBusy, acquire, commit_lock
from image_search.storage import LocalStore, S3Store
from tests.conftest import REPO_ROOT
from tests.living import poll
from tests.s3_server import S3Server, moto_s3

BUCKET = "lock-tests"
LONG_LEASE_S = 3.0  # refreshed every second: a long build's lease, scaled down
HOLD_SCRIPT = """
import sys
from image_search.commit_lock import acquire
from image_search.storage import LocalStore
lease = acquire(LocalStore(sys.argv[1]), "builder in a child")
print("held", flush=True)
sys.stdin.read()  # hold until killed
"""


def test_a_second_writer_is_told_who_holds_the_folder(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with commit_lock(store, "first builder"), pytest.raises(LockBusy, match="first builder"):
        acquire(store, "second builder")
    with commit_lock(store, "second builder") as lease:
        assert lease.holder == "second builder"


def test_a_killed_holder_leaves_no_stale_folder_lock(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_SCRIPT, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(LockBusy, match="builder in a child"):
            acquire(LocalStore(tmp_path), "parent")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        acquire(LocalStore(tmp_path), "parent").release()  # the kernel dropped the dead holder's lock
    finally:
        child.kill()
        child.wait(timeout=30)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with moto_s3() as server:
        server.client().create_bucket(Bucket=BUCKET)
        yield server


def s3_store(server: S3Server, prefix: str) -> S3Store:
    return S3Store(f"s3://{BUCKET}/{prefix}", client=server.client())


def test_a_second_writer_is_told_who_holds_the_s3_lease(s3: S3Server) -> None:
    store = s3_store(s3, "busy")
    lease = acquire(store, "writer replica")
    with pytest.raises(LockBusy, match="writer replica"):
        acquire(store, "builder")
    lease.refresh()
    lease.release()
    acquire(store, "builder").release()


def test_an_expired_s3_lease_is_taken_over_and_its_old_holder_learns_it(s3: S3Server) -> None:
    store = s3_store(s3, "expired")
    crashed = acquire(store, "crashed builder", lease_s=-1.0)  # as if its holder died long ago
    crashed.stop_refreshing()  # as a dead holder does
    taker = acquire(store, "new builder")
    with pytest.raises(LockBusy, match="taken"):
        crashed.refresh()
    crashed.release()  # not its lease any more: left alone
    with pytest.raises(LockBusy, match="new builder"):
        acquire(store, "third")
    taker.release()


def test_of_many_racing_writers_exactly_one_gets_the_s3_lease(s3: S3Server) -> None:
    store = s3_store(s3, "race")
    crashed = acquire(store, "dead", lease_s=-1.0)
    crashed.stop_refreshing()
    winners: list[str] = []
    losers: list[str] = []
    start = threading.Barrier(6)

    def race(name: str) -> None:
        mine = S3Store(store.uri, client=s3.client())
        start.wait()
        try:
            acquire(mine, name)
            winners.append(name)
        except LockBusy:
            losers.append(name)

    threads = [threading.Thread(target=race, args=(f"writer {i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(winners) == 1 and len(losers) == 5
    assert winners[0] in s3.client().get_object(Bucket=BUCKET, Key=f"race/{LEASE_KEY}")["Body"].read().decode()


def lease_on_s3(server: S3Server, prefix: str) -> dict[str, object]:
    body = server.client().get_object(Bucket=BUCKET, Key=f"{prefix}/{LEASE_KEY}")["Body"].read()
    return dict(json.loads(body))


def test_a_held_s3_lease_is_refreshed_so_a_build_longer_than_it_keeps_it(s3: S3Server) -> None:
    store = s3_store(s3, "long")
    lease = acquire(store, "long build", lease_s=LONG_LEASE_S)
    first_expiry = float(lease_on_s3(s3, "long")["expires_at"])  # type: ignore[arg-type]
    try:
        # Held past the lifetime it was created with: its holder's refreshes moved the expiry on.
        poll(lambda: time.time() > first_expiry + 1.0, 4 * LONG_LEASE_S, "the first expiry passed")
        assert float(lease_on_s3(s3, "long")["expires_at"]) > time.time()  # type: ignore[arg-type]
        with pytest.raises(LockBusy, match="long build"):
            acquire(store, "the Writer")
        lease.check()
    finally:
        lease.release()
    acquire(store, "the Writer").release()  # released: free at once


def test_a_holder_whose_s3_lease_was_taken_over_learns_it_from_check(s3: S3Server) -> None:
    store = s3_store(s3, "stolen")
    lease = acquire(store, "slow writer", lease_s=LONG_LEASE_S)
    try:
        # Another process overwrites it (as a takeover after missed refreshes would): the next refresh sees it.
        body = json.dumps({"holder": "the thief", "expires_at": time.time() + 600}).encode()
        s3.client().put_object(Bucket=BUCKET, Key=f"stolen/{LEASE_KEY}", Body=body)
        poll(lambda: lease.lost is not None, 4 * LONG_LEASE_S, "the refresher noticing")  # type: ignore[attr-defined]
        with pytest.raises(LockBusy, match="taken"):
            lease.check()
    finally:
        lease.release()
    assert lease_on_s3(s3, "stolen")["holder"] == "the thief"  # not deleted by the one that lost it
