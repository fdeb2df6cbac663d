"""Live index swaps in a real Serve app: a rebuild is picked up under load without a failed request,
every answer comes from one version, broken publishes are refused while the old version serves on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import REQUEST_TIMEOUT_S
from tests.living import (
    RELOAD_INTERVAL_S,
    build,
    current_version,
    ids_and_keys,
    info,
    manifest_of,
    point_current_at,
    poll,
    replica_pids,
    search,
    served_app,
    wait_for_version,
)
from tests.support import make_clip_checkpoint, write_image_folder

APP = "live"
CLIENTS = 16
LOAD_DEADLINE_S = 240
ANSWERS_BEFORE_PUBLISH = 32
ANSWERS_AFTER_SWAP = 64
SEARCHER_THREADS = 2


@dataclass
class Live:
    base_url: str
    collection: Path
    out: Path
    model: Path


@pytest.fixture(scope="module")
def live(serve_port: int, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("live")
    collection, out = root / "collection", root / "index"
    write_image_folder(collection, 12)
    build(collection, out, tiny_model_dir)
    args = {
        "model": str(tiny_model_dir),
        "index": str(out),
        "embedder": {"num_threads": 1},
        "searcher": {"num_threads": SEARCHER_THREADS},
        "reload_interval_s": RELOAD_INTERVAL_S,
        "request_timeout_s": REQUEST_TIMEOUT_S,
    }
    with served_app(APP, serve_port, args) as base_url:
        yield Live(base_url, collection, out, tiny_model_dir)


@dataclass
class Answer:
    at: float  # time.time() when the answer arrived
    status: int
    body: dict[str, Any] | None


def load_during(base_url: str, payload: bytes, publish: Any) -> tuple[list[Answer], float, str]:
    """16 clients search until the new version answered ANSWERS_AFTER_SWAP times (bounded by a deadline).

    `publish` runs once ANSWERS_BEFORE_PUBLISH answers came back; it returns the new version's name and
    the time CURRENT was written.
    """
    answers: list[Answer] = []
    lock = threading.Lock()
    enough_before = threading.Event()
    done = threading.Event()
    new_version: list[str] = []
    deadline = time.monotonic() + LOAD_DEADLINE_S

    def client() -> None:
        while not done.is_set() and time.monotonic() < deadline:
            try:
                response = search(base_url, payload, timeout=REQUEST_TIMEOUT_S + 15)
                answer = Answer(time.time(), response.status_code, response.json())
            except (requests.RequestException, ValueError):
                answer = Answer(time.time(), -1, None)  # a hang, a dropped connection or a non-JSON body
            with lock:
                answers.append(answer)
                if len(answers) >= ANSWERS_BEFORE_PUBLISH:
                    enough_before.set()
                if new_version:
                    after = sum(1 for a in answers if a.body and a.body.get("index_version") == new_version[0])
                    if after >= ANSWERS_AFTER_SWAP:
                        done.set()

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        futures = [pool.submit(client) for _ in range(CLIENTS)]
        assert enough_before.wait(LOAD_DEADLINE_S)
        name, published_at = publish()
        with lock:
            new_version.append(name)
        for future in futures:
            future.result()
    assert done.is_set(), "the new version never answered enough requests before the deadline"
    return answers, published_at, name


def test_searches_run_with_the_configured_faiss_threads(live: Live) -> None:
    """Ray gives a 0.25-CPU replica OMP_NUM_THREADS=1; the search thread still uses the configured count."""
    from ray import serve

    handle = serve.get_deployment_handle("Searcher", app_name=APP)
    assert {handle.omp_threads.remote().result(timeout_s=60) for _ in range(8)} == {SEARCHER_THREADS}


def test_swap_under_load_fails_nothing_and_each_answer_is_one_version(live: Live, artifact_dir: Path) -> None:
    old = current_version(live.out)
    old_records = ids_and_keys(manifest_of(live.out, old))
    # The next version: two images removed, three added (only the new version can return those).
    removed = sorted(live.collection.rglob("img_*"))[:2]
    for path in removed:
        path.unlink()
    added = write_image_folder(live.collection / "added", 3, start_seed=500)
    query = added[0].read_bytes()

    def publish() -> tuple[str, float]:
        name = build(live.collection, live.out, live.model)
        return name, (live.out / "CURRENT").stat().st_mtime

    answers, published_at, new = load_during(live.base_url, query, publish)
    new_records = ids_and_keys(manifest_of(live.out, new))
    assert new != old
    added_keys = {path.relative_to(live.collection).as_posix() for path in added}
    removed_keys = {path.relative_to(live.collection).as_posix() for path in removed}
    assert added_keys <= set(new_records.values()) and not removed_keys & set(new_records.values())
    # Stable ids: every image that stayed keeps its id.
    assert {i: k for i, k in new_records.items() if i in old_records} == {
        i: k for i, k in old_records.items() if k in set(new_records.values())
    }

    statuses = [a.status for a in answers]
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
    by_version = {old: old_records, new: new_records}
    for answer in answers:
        assert answer.body is not None
        version = answer.body["index_version"]
        (result,) = answer.body["results"]
        matches = {m["id"]: m["path"] for m in result["matches"]}
        # k exceeds both collections, so each answer lists exactly its version's images, under their ids.
        assert matches == by_version[version], version
    new_answers = [a for a in answers if a.body and a.body["index_version"] == new]
    top = new_answers[0].body["results"][0]["matches"][0] if new_answers[0].body else {}
    assert top["path"] in added_keys and top["score"] > 0.99
    # No request outlives the deadline, so after one deadline past the switch only the new version answers.
    switched = new_answers[0].at
    assert all(a.body and a.body["index_version"] == new for a in answers if a.at > switched + REQUEST_TIMEOUT_S)

    swap_s = min(a.at for a in new_answers) - published_at
    record = {
        "clients": CLIENTS,
        "requests": len(answers),
        "failed": len(answers) - statuses.count(200),
        "answered_by_old": len(answers) - len(new_answers),
        "answered_by_new": len(new_answers),
        "reload_interval_s": RELOAD_INTERVAL_S,
        "publish_to_first_new_answer_s": round(swap_s, 3),
    }
    (artifact_dir / "live-reload.json").write_text(json.dumps(record, indent=2))
    print("live reload:", record)
    assert info(live.base_url)["index_version"] == new
    # Stable ids over HTTP: a removed image's id is 404 from the new version on, never another image.
    for image_id, key in old_records.items():
        response = requests.get(f"{live.base_url}/images/{image_id}", timeout=30)
        if key in removed_keys:
            assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
        else:
            assert response.status_code == 200 and response.content == (live.collection / key).read_bytes()


def healthz_status(base_url: str) -> str | None:
    try:
        return str(requests.get(f"{base_url}/healthz", timeout=10).json().get("status"))
    except (requests.RequestException, ValueError):
        return None  # the Ingress is being replaced


def publish_copy(out: Path, good: str, name: str) -> list[Path]:
    """A version `name` like `good` but whose first segment is a copy with a damaged index file, not yet
    published (the caller moves CURRENT to it); the paths to remove afterwards."""
    from dataclasses import replace

    from image_search.segments import read_version, segment_folder, version_file
    from image_search.storage import LocalStore

    version = read_version(LocalStore(out), good)
    first = version.segments[0]
    copy = replace(first, name=f"{first.name}-damaged-{name[-8:]}")
    shutil.copytree(out / segment_folder(first.name), out / segment_folder(copy.name))
    flip_a_byte(out / segment_folder(copy.name) / "index.faiss")
    deleted = {copy.name if seg == first.name else seg: ids for seg, ids in version.deleted.items()}
    damaged = replace(version, name=name, segments=(copy, *version.segments[1:]), deleted=deleted)
    (out / version_file(name)).parent.mkdir(parents=True)
    (out / version_file(name)).write_text(damaged.to_json())
    return [out / "versions" / name, out / segment_folder(copy.name)]


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_old_version_keeps_serving(live: Live, good: str, bad: str) -> None:
    served = poll(lambda: bad in (i := info(live.base_url))["refused_versions"] and i, what=f"{bad} refused")
    assert served["index_version"] == good
    query = next(live.collection.rglob("img_*")).read_bytes()
    for _ in range(4):
        response = search(live.base_url, query)
        assert response.status_code == 200 and response.json()["index_version"] == good


def test_corrupt_publish_is_refused_and_the_old_version_keeps_serving(live: Live) -> None:
    good = current_version(live.out)
    bad = "29990101T000000Z-corrupt0"
    damaged = publish_copy(live.out, good, bad)
    point_current_at(live.out, bad)
    try:
        assert_old_version_keeps_serving(live, good, bad)
        health = requests.get(f"{live.base_url}/healthz", timeout=30).json()
        assert health["index_version"] == good and bad in health["refused_versions"]
    finally:
        point_current_at(live.out, good)
        for path in damaged:
            shutil.rmtree(path)


def test_ingress_restarted_while_current_is_broken_starts_on_the_newest_good_version(live: Live) -> None:
    good = current_version(live.out)
    bad = "29990101T000000Z-corrupt1"
    damaged = publish_copy(live.out, good, bad)
    point_current_at(live.out, bad)
    try:
        (old_pid,) = replica_pids(APP, "Ingress")
        os.kill(old_pid, signal.SIGKILL)

        def replaced() -> bool:
            pids = replica_pids(APP, "Ingress")
            return bool(pids) and old_pid not in pids and healthz_status(live.base_url) == "ok"

        poll(replaced, what="a new Ingress replica, healthy")
        assert_old_version_keeps_serving(live, good, bad)
    finally:
        point_current_at(live.out, good)
        for path in damaged:
            shutil.rmtree(path)


def test_publish_of_another_model_is_refused_and_the_old_version_keeps_serving(live: Live, tmp_path: Path) -> None:
    good = current_version(live.out)
    other_model = make_clip_checkpoint(tmp_path / "other-model", seed=1)  # same dimension, other weights
    bad = build(live.collection, live.out, other_model)
    try:
        assert_old_version_keeps_serving(live, good, bad)
    finally:
        point_current_at(live.out, good)


def test_following_resumes_with_the_next_good_publish(live: Live) -> None:
    before = current_version(live.out)
    write_image_folder(live.collection / "later", 1, start_seed=900)
    after = build(live.collection, live.out, live.model)
    assert after != before
    served = wait_for_version(live.base_url, after)
    assert served["index_size"] == len(manifest_of(live.out, after)["records"])
