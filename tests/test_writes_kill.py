"""The kill test: SIGKILL the Writer replica at 20+ random points during ~200 mixed writes from 4 clients.

Each client owns its keys and repeats an unanswered write until it is answered (a 503 while the Writer
is down, a dropped connection): a put of the same bytes under the same key and a delete of the same id
are idempotent, so every key's final state is known to the test. After the last kill and the Writer's
recovery: every acknowledged image is live with its id and bytes and found by a search for itself
exactly once, every acknowledged delete is gone, no id was given twice or changed meaning, and the
collection holds exactly the indexed files (no bytes stored but not committed, no intent left).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from image_search.artifact import load_artifact
from image_search.storage import LocalStore
from tests.living import build, info, poll, search, served_app
from tests.test_writes_http import AUTH, TOKEN, jpeg

APP = "writes-kill"
CLIENTS = 4
OPS_PER_CLIENT = 50
MIN_KILLS = 20
MAX_ATTEMPTS = 400  # per write: far more than 20 restarts need
RETRY_PAUSE_S = 0.1  # a client's back-off before sending an unanswered write again (not a synchronisation)
RESTART_TIMEOUT_S = 120
SEARCH_SAMPLE = 20


def writer_pids() -> list[int]:
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[0]) for line in listing.splitlines() if f"ServeReplica:{APP}:Writer" in line]


@pytest.fixture(scope="module")
def kill_app(
    tmp_path_factory: pytest.TempPathFactory, image_folder: Path, tiny_model_dir: Path, serve_port: int
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("writes-kill")
    images, index = root / "images", root / "index"
    shutil.copytree(image_folder, images)
    build(images, index, tiny_model_dir)
    (root / "token").write_text(TOKEN)
    args = {
        "model": str(tiny_model_dir),
        "index": str(index),
        "embedder": {"num_threads": 1},
        "request_timeout_s": 20,
        "reload_interval_s": 0.5,
        "writes": {"token_file": str(root / "token"), "lock_wait_s": 5},
    }
    options = {
        # Found dead within a second, so 20 restarts fit in the test's time.
        "Writer": {"ray_actor_options": {"num_cpus": 0.1}, "health_check_period_s": 1, "health_check_timeout_s": 5},
        "Ingress": {"ray_actor_options": {"num_cpus": 0.1}},
    }
    with served_app(APP, serve_port, args, options) as base_url:
        yield {"url": base_url, "images": images, "index": index}


@dataclass
class Ledger:
    """What the clients were told: the final state of every key, every id given, every id deleted."""

    live: dict[str, tuple[int, str]] = field(default_factory=dict)  # key -> (id, sha256)
    key_of_id: dict[int, str] = field(default_factory=dict)
    deleted: set[int] = field(default_factory=set)
    answered: int = 0
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def send(make: Any) -> requests.Response:
    """Send until answered by the Writer (not a 503, not a dropped connection)."""
    for _ in range(MAX_ATTEMPTS):
        try:
            answer = make()
        except requests.RequestException:
            answer = None
        if answer is not None and answer.status_code not in (502, 503, 504):
            return answer
        time.sleep(RETRY_PAUSE_S)
    raise AssertionError(f"a write was never answered in {MAX_ATTEMPTS} attempts")


def client(url: str, number: int, ledger: Ledger, kills: list[int], failures: list[str]) -> None:
    rng = random.Random(number)
    mine: dict[str, int] = {}  # my live keys -> id
    done = 0
    try:
        while done < OPS_PER_CLIENT or (len(kills) < MIN_KILLS and done < 4 * OPS_PER_CLIENT):
            done += 1
            choice = rng.random()
            if not mine or choice < 0.5 or (choice < 0.75 and len(mine) < 2):
                key = f"kill/c{number}/{done}.jpg"
                data = jpeg(10_000 * (number + 1) + done)
            elif choice < 0.75:
                key = rng.choice(sorted(mine))
                data = jpeg(10_000 * (number + 1) + 5_000 + done)
            else:
                key = rng.choice(sorted(mine))
                image_id = mine.pop(key)
                answer = send(
                    lambda: requests.delete(f"{url}/images/{image_id}", headers=AUTH, timeout=30)  # noqa: B023
                )
                # 404: an earlier, unanswered attempt deleted it already.
                assert answer.status_code in (200, 404), answer.text
                with ledger.lock:
                    ledger.live.pop(key)
                    ledger.deleted.add(image_id)
                    ledger.answered += 1
                continue
            files = [("files", ("x.jpg", data, "image/jpeg")), ("key", (None, key))]
            wait = "indexed" if rng.random() < 0.25 else "stored"  # both kinds of acknowledgement
            answer = send(
                lambda: requests.post(f"{url}/images", files=files, params={"wait": wait}, headers=AUTH, timeout=30)  # noqa: B023
            )
            assert answer.status_code in (201, 202), answer.text
            (entry,) = answer.json()["results"]
            with ledger.lock:
                first = ledger.key_of_id.setdefault(entry["id"], key)
                assert first == key, f"id {entry['id']} given to {first} and to {key}"
                if key in mine:
                    assert entry["id"] == mine[key], "a replaced key kept its id"
                ledger.live[key] = (entry["id"], hashlib.sha256(data).hexdigest())
                ledger.answered += 1
            mine[key] = entry["id"]
    except Exception as exc:
        failures.append(f"client {number}: {exc!r}")


def killer(stop: threading.Event, ledger: Ledger, kills: list[int], failures: list[str]) -> None:
    rng = random.Random(1234)
    try:
        while not stop.is_set():
            # Kill amid traffic: once the new Writer answered a write, at a random point after.
            answered = ledger.answered
            poll(lambda: stop.is_set() or ledger.answered > answered, RESTART_TIMEOUT_S, "a write answered")  # noqa: B023
            if stop.wait(rng.uniform(0.0, 0.8)):
                return
            pids = writer_pids()
            if not pids:
                continue
            os.kill(pids[0], signal.SIGKILL)
            kills.append(pids[0])
            poll(lambda: [p for p in writer_pids() if p not in kills], RESTART_TIMEOUT_S, "a new Writer replica")
    except Exception as exc:
        failures.append(f"killer: {exc!r}")


def test_acknowledged_writes_survive_a_writer_sigkilled_at_random_points(kill_app: dict[str, Any]) -> None:
    url, images, index = kill_app["url"], kill_app["images"], kill_app["index"]
    ledger, kills, failures = Ledger(), [], []
    stop = threading.Event()
    chaos = threading.Thread(target=killer, args=(stop, ledger, kills, failures))
    chaos.start()
    clients = [threading.Thread(target=client, args=(url, n, ledger, kills, failures)) for n in range(CLIENTS)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=900)
    stop.set()
    chaos.join(timeout=RESTART_TIMEOUT_S + 10)
    assert not failures, failures
    assert len(kills) >= MIN_KILLS and ledger.answered >= CLIENTS * OPS_PER_CLIENT

    # The Writer is back (it recovered at start) and this Ingress serves CURRENT.
    assert send(lambda: requests.delete(f"{url}/images/999999999", headers=AUTH, timeout=30)).status_code == 404
    current = (index / "CURRENT").read_text().strip()
    poll(lambda: info(url)["index_version"] >= current, what="the Ingress serving CURRENT")

    served = load_artifact(LocalStore(index), cache_dir=index.parent / "cache").manifest
    written = {r.key: (r.id, r.sha256) for r in served.records if r.key.startswith("kill/")}
    assert written == ledger.live  # every acknowledged add/replace with its id, every delete gone
    live_ids = {r.id for r in served.records}
    assert not (ledger.deleted & live_ids)
    assert all(ledger.key_of_id[r.id] == r.key for r in served.records if r.id in ledger.key_of_id)
    # The collection holds exactly what is indexed: nothing stored and never committed, no intent left.
    on_disk = {
        path.relative_to(images).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in (images / "kill").rglob("*")
        if path.is_file()
    }
    assert on_disk == {key: sha for key, (_, sha) in ledger.live.items()}
    assert not list((index / "writes" / "intents").glob("*"))

    # Searches find each acknowledged image exactly once, under its id.
    for key in random.Random(7).sample(sorted(ledger.live), min(SEARCH_SAMPLE, len(ledger.live))):
        image_id, _ = ledger.live[key]
        matches = search(url, (images / key).read_bytes(), k=100).json()["results"][0]["matches"]
        assert matches[0]["id"] == image_id and [m["id"] for m in matches].count(image_id) == 1
    for image_id in sorted(ledger.deleted)[:5]:
        assert requests.get(f"{url}/images/{image_id}", timeout=30).status_code == 404
