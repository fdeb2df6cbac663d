"""The kill test: SIGKILL the Writer, the Ingress or a Searcher replica, one at a time, at random points
during ~200 mixed writes from 4 clients while a reader searches.

The kill points are spread over the three roles in one run (`KILLS_PER_TARGET` each, shuffled), so one
app start and one stream of writes cover all three; each point kills exactly one replica process
(`os.kill(pid, SIGKILL)` on the pid of a replica actor of this test's own Ray cluster) and waits for
Serve to replace it before the next. Each client owns its keys and repeats an unanswered write until
it is answered (a 503 while a replica is down, a dropped connection, the proxy's bare 500 when the
Ingress died under the request): a put of the same bytes under
the same key and a delete of the same id are idempotent, so every key's final state is known to the
test. After the last kill and the replicas' recovery: every acknowledged image is live with its id
and bytes and found by a search for itself exactly once, every acknowledged delete is gone, no id was
given twice or changed meaning, and the collection holds exactly the indexed files (no bytes stored
but not committed, no intent left).

No answer mixes versions: every search answer names its `index_version`, and with k above the
collection's size an exact (Flat) search of that version returns ALL of its live images. So each
answer must list exactly that version's live set (read from the store afterwards), under that
version's keys, and when that version holds the query's own bytes their id comes first with a score
of 1 (a Searcher that searched an older version, or an Ingress that mapped ids through another
version's records, fails this). Every write answer's `index_version` must hold that write.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from image_search.artifact import load_artifact
from image_search.errors import ArtifactError
from image_search.segments import read_contents, read_version
from image_search.storage import LocalStore
from tests.living import build, info, poll, replica_pids, search, served_app
from tests.test_writes_http import AUTH, TOKEN, jpeg

APP = "writes-kill"
CLIENTS = 4
OPS_PER_CLIENT = 50
TARGETS = ("Writer", "Ingress", "Searcher")
# 8 x 3 = 24 kill points in one run keeps the test near two minutes on two shared cores; the issue's
# "20 random points per role" as three separate runs is WRITES_KILL_POINTS_PER_TARGET=20 (~4x longer).
KILLS_PER_TARGET = int(os.environ.get("WRITES_KILL_POINTS_PER_TARGET", "8"))
SEARCHERS = 2
MAX_K = 500  # above the collection's size (24 + at most CLIENTS * OPS_PER_CLIENT * 4 live), for the version check
SELF_SCORE = 0.9999  # an image searched by its own bytes scores 1 (seen: 1.00000; other images up to 0.9985)
MAX_OPS_PER_KILL = 30  # per client: a bound on how long writes go on waiting for the kill points
MAX_ATTEMPTS = 400  # per write: far more than the kills need
RETRY_PAUSE_S = 0.1  # a client's back-off before sending an unanswered write again (not a synchronisation)
RESTART_TIMEOUT_S = 120
SEARCH_SAMPLE = 20
UNANSWERED = (502, 503, 504)  # the proxy or our Ingress saying "not now": the request is repeated


def unanswered(response: requests.Response) -> bool:
    """Not an answer from the app: "not now" (502/503/504), or Serve's proxy's bare 500 for a request
    whose Ingress replica died under it (Ray's proxy, http_util.get_http_response_status). Our own
    errors are always the JSON error shape, so a 500 of ours still fails the test."""
    if response.status_code in UNANSWERED:
        return True
    return response.status_code == 500 and not response.headers.get("content-type", "").startswith("application/json")


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
        "limits": {"max_k": MAX_K},
        "request_timeout_s": 20,
        "reload_interval_s": 0.5,
        "writes": {"token_file": str(root / "token"), "lock_wait_s": 5},
    }
    # Found dead within a second, so the restarts fit in the test's time.
    fast = {"health_check_period_s": 1, "health_check_timeout_s": 5}
    options = {
        "Writer": {"ray_actor_options": {"num_cpus": 0.1}, **fast},
        "Ingress": {"ray_actor_options": {"num_cpus": 0.1}, **fast},
        "Searcher": {"num_replicas": SEARCHERS, "ray_actor_options": {"num_cpus": 0.1}, **fast},
    }
    with served_app(APP, serve_port, args, options) as base_url:
        yield {"url": base_url, "images": images, "index": index}


@dataclass
class Ledger:
    """What the clients were told: the final state of every key, every id given, every id deleted."""

    live: dict[str, tuple[int, str]] = field(default_factory=dict)  # key -> (id, sha256)
    key_of_id: dict[int, str] = field(default_factory=dict)
    deleted: set[int] = field(default_factory=set)
    # (index_version answered, key, id, sha256 or None for a delete): each must hold in that version.
    acknowledged: list[tuple[str, str, int, str | None]] = field(default_factory=list)
    sent: list[tuple[str, bytes]] = field(default_factory=list)  # every put sent: (key, bytes), for the reader
    answered: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Answer:
    """One search answer as the reader got it: its version, its query, its matches (id, path, score)."""

    version: str
    key: str
    sha256: str
    matches: tuple[tuple[int, str, float], ...]


# Live images of a version: id -> (key, sha256).
Live = dict[int, tuple[str, str]]


def answer_problems(answer: Answer, live: Live | None) -> list[str]:
    """Why `answer` is not entirely an exact search of the version it names; empty when it is."""
    if live is None:
        return [f"the answer names {answer.version}, which is not a published version"]
    if len(live) > MAX_K:
        return [f"{answer.version} holds {len(live)} images, more than k={MAX_K}: the check cannot see all"]
    problems = []
    found = {image_id: path for image_id, path, _ in answer.matches}
    if len(found) != len(answer.matches):
        problems.append(f"an id listed twice in one answer of {answer.version}")
    missing, extra = sorted(live.keys() - found.keys()), sorted(found.keys() - live.keys())
    if missing or extra:
        problems.append(f"answer of {answer.version} lacks its live ids {missing[:5]} / lists others {extra[:5]}")
    renamed = sorted(i for i, path in found.items() if i in live and live[i][0] != path)
    if renamed:
        problems.append(f"answer of {answer.version} lists ids {renamed[:5]} under keys that version does not")
    own = [i for i, (key, sha) in live.items() if key == answer.key and sha == answer.sha256]
    if own:
        best_id, _, best_score = answer.matches[0] if answer.matches else (-1, "", 0.0)
        if best_id != own[0] or best_score < SELF_SCORE:
            problems.append(
                f"{answer.version} holds the query's bytes as id {own[0]}, but the answer's best match is "
                f"{best_id} scoring {best_score:.4f} (searched with another version's vectors?)"
            )
    return problems


def test_the_version_check_flags_answers_that_mix_versions() -> None:
    """The check above can fail: an answer from another version's ids, or with another version's vector."""
    older: Live = {1: ("a.jpg", "sha-a"), 2: ("b.jpg", "sha-b1")}
    newer: Live = {1: ("a.jpg", "sha-a"), 2: ("b.jpg", "sha-b2"), 3: ("c.jpg", "sha-c")}
    exact = Answer("v2", "b.jpg", "sha-b2", ((2, "b.jpg", 1.0), (1, "a.jpg", 0.3), (3, "c.jpg", 0.2)))
    assert answer_problems(exact, newer) == []
    assert answer_problems(exact, older)  # lists id 3, which the named version lacks
    assert answer_problems(Answer("v2", "b.jpg", "sha-b2", ((2, "b.jpg", 1.0), (1, "a.jpg", 0.3))), newer)
    # The same ids, but id 2 searched with its older vector: the query's own bytes do not score 1.
    stale = Answer("v2", "b.jpg", "sha-b2", ((1, "a.jpg", 0.5), (2, "b.jpg", 0.4), (3, "c.jpg", 0.2)))
    assert answer_problems(stale, newer)
    assert answer_problems(Answer("v2", "c.jpg", "sha-c", ((3, "x.jpg", 1.0), (1, "a.jpg", 0.3))), newer)
    assert answer_problems(exact, None)


def send(make: Callable[[], requests.Response]) -> requests.Response:
    """Send until answered (not a 502/503/504, not a dropped connection)."""
    for _ in range(MAX_ATTEMPTS):
        try:
            answer = make()
        except requests.RequestException:
            answer = None
        if answer is not None and not unanswered(answer):
            return answer
        time.sleep(RETRY_PAUSE_S)
    raise AssertionError(f"a write was never answered in {MAX_ATTEMPTS} attempts")


def client(url: str, number: int, ledger: Ledger, kills: list[tuple[str, int]], failures: list[str]) -> None:
    rng = random.Random(number)
    mine: dict[str, int] = {}  # my live keys -> id
    done = 0
    goal = KILLS_PER_TARGET * len(TARGETS)
    try:
        # At least OPS_PER_CLIENT, and on until the last kill point has passed (bounded).
        while done < OPS_PER_CLIENT or (len(kills) < goal and done < OPS_PER_CLIENT + MAX_OPS_PER_KILL * goal):
            done += 1
            choice = rng.random()
            wait = "indexed" if rng.random() < 0.25 else "stored"  # both kinds of acknowledgement
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
                    lambda: requests.delete(
                        f"{url}/images/{image_id}",  # noqa: B023
                        params={"wait": wait},  # noqa: B023
                        headers=AUTH,
                        timeout=30,
                    )
                )
                # 404: an earlier, unanswered attempt deleted it already.
                assert answer.status_code in (200, 202, 404), answer.text
                with ledger.lock:
                    ledger.live.pop(key)
                    ledger.deleted.add(image_id)
                    if answer.status_code != 404:
                        ledger.acknowledged.append((answer.json()["index_version"], key, image_id, None))
                    ledger.answered += 1
                continue
            with ledger.lock:
                ledger.sent.append((key, data))
            files = [("files", ("x.jpg", data, "image/jpeg")), ("key", (None, key))]
            answer = send(
                lambda: requests.post(f"{url}/images", files=files, params={"wait": wait}, headers=AUTH, timeout=30)  # noqa: B023
            )
            assert answer.status_code in (201, 202), answer.text
            (entry,) = answer.json()["results"]
            sha = hashlib.sha256(data).hexdigest()
            with ledger.lock:
                first = ledger.key_of_id.setdefault(entry["id"], key)
                assert first == key, f"id {entry['id']} given to {first} and to {key}"
                if key in mine:
                    assert entry["id"] == mine[key], "a replaced key kept its id"
                ledger.live[key] = (entry["id"], sha)
                ledger.acknowledged.append((answer.json()["index_version"], key, entry["id"], sha))
                ledger.answered += 1
            mine[key] = entry["id"]
    except Exception as exc:
        failures.append(f"client {number}: {exc!r}")


def reader(url: str, stop: threading.Event, ledger: Ledger, answers: list[Answer], failures: list[str]) -> None:
    """Search for recently written images all along (whatever is down): the answers are checked afterwards."""
    rng = random.Random(99)
    try:
        while not stop.is_set():
            with ledger.lock:
                recent = ledger.sent[-2 * CLIENTS :]
            if not recent:
                stop.wait(RETRY_PAUSE_S)
                continue
            key, data = rng.choice(recent)
            try:
                response = search(url, data, k=MAX_K, timeout=30)
            except requests.RequestException:
                stop.wait(RETRY_PAUSE_S)
                continue
            if unanswered(response):
                stop.wait(RETRY_PAUSE_S)
                continue
            assert response.status_code == 200, response.text
            body = response.json()
            matches = tuple((m["id"], m["path"], m["score"]) for m in body["results"][0]["matches"])
            answers.append(Answer(body["index_version"], key, hashlib.sha256(data).hexdigest(), matches))
    except Exception as exc:
        failures.append(f"reader: {exc!r}")


def running_replicas(deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def killer(stop: threading.Event, ledger: Ledger, kills: list[tuple[str, int]], failures: list[str]) -> None:
    rng = random.Random(1234)
    schedule = [target for target in TARGETS for _ in range(KILLS_PER_TARGET)]
    rng.shuffle(schedule)
    wanted = {"Writer": 1, "Ingress": 1, "Searcher": SEARCHERS}
    killed: set[int] = set()
    try:
        for target in schedule:
            # Kill amid traffic: once a write was answered after the last kill, at a random point after.
            answered = ledger.answered
            poll(lambda: stop.is_set() or ledger.answered > answered, RESTART_TIMEOUT_S, "a write answered")  # noqa: B023
            if stop.wait(rng.uniform(0.0, 0.8)):
                return
            pids = [pid for pid in replica_pids(APP, target) if pid not in killed]
            if not pids:
                continue
            pid = rng.choice(pids)
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
            kills.append((target, pid))

            def replaced(target: str = target) -> bool:
                alive = [p for p in replica_pids(APP, target) if p not in killed]
                return len(alive) >= wanted[target] and running_replicas(target) >= wanted[target]

            poll(replaced, RESTART_TIMEOUT_S, f"a new {target} replica running")
    except Exception as exc:
        failures.append(f"killer: {exc!r}")


def live_of(index: Path, version: str) -> Live | None:
    """A published version's live images, read from the store (None: no such version)."""
    store = LocalStore(index)
    try:
        records = read_contents(store, read_version(store, version)).live()
    except ArtifactError:
        return None
    return {record.id: (record.key, record.sha256) for record in records}


def test_acknowledged_writes_survive_replicas_sigkilled_at_random_points(kill_app: dict[str, Any]) -> None:
    url, images, index = kill_app["url"], kill_app["images"], kill_app["index"]
    ledger, kills, failures = Ledger(), [], []
    answers: list[Answer] = []
    stop = threading.Event()
    chaos = threading.Thread(target=killer, args=(stop, ledger, kills, failures))
    reading = threading.Thread(target=reader, args=(url, stop, ledger, answers, failures))
    chaos.start()
    reading.start()
    clients = [threading.Thread(target=client, args=(url, n, ledger, kills, failures)) for n in range(CLIENTS)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=900)
    stop.set()
    chaos.join(timeout=RESTART_TIMEOUT_S + 10)
    reading.join(timeout=60)
    assert not failures, failures
    killed_roles = {target: sum(1 for role, _ in kills if role == target) for target in TARGETS}
    assert killed_roles == dict.fromkeys(TARGETS, KILLS_PER_TARGET), killed_roles
    assert ledger.answered >= CLIENTS * OPS_PER_CLIENT

    # Everything is back (the Writer recovered at its start) and the Ingress serves CURRENT.
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

    # Every write answer's version holds that write; every search answer is exactly its version's.
    versions: dict[str, Live | None] = {}

    def version(name: str) -> Live | None:
        if name not in versions:
            versions[name] = live_of(index, name)
        return versions[name]

    for name, key, image_id, sha in ledger.acknowledged:
        held = version(name) or {}
        if sha is None:
            assert image_id not in held, f"{name}, answered for the delete of {image_id}, still holds it"
        else:
            assert held.get(image_id) == (key, sha), f"{name}, answered for {key} as {image_id}, holds otherwise"
    assert len(answers) >= len(kills), f"only {len(answers)} searches answered during the kills"
    mixed = [problem for answer in answers for problem in answer_problems(answer, version(answer.version))]
    assert not mixed, mixed[:10]
    runners_up = [answer.matches[1][2] for answer in answers if len(answer.matches) > 1]
    selves = [
        answer.matches[0][2]
        for answer in answers
        if (answer.key, answer.sha256) in (version(answer.version) or {}).values()
    ]
    print(
        f"kills {killed_roles}; {ledger.answered} writes answered; {len(answers)} search answers over "
        f"{len({answer.version for answer in answers})} versions checked; self match scores "
        f"{min(selves, default=0):.5f}..{max(selves, default=0):.5f}, best runner-up {max(runners_up, default=0):.5f}"
    )

    # Searches find each acknowledged image exactly once, under its id.
    for key in random.Random(7).sample(sorted(ledger.live), min(SEARCH_SAMPLE, len(ledger.live))):
        image_id, _ = ledger.live[key]
        matches = search(url, (images / key).read_bytes(), k=MAX_K).json()["results"][0]["matches"]
        assert matches[0]["id"] == image_id and [m["id"] for m in matches].count(image_id) == 1
    for image_id in sorted(ledger.deleted)[:5]:
        assert requests.get(f"{url}/images/{image_id}", timeout=30).status_code == 404
