"""The Writer's commit without Ray: durable bytes, one segment per batch, recovery, a full disk, the lock.

The index is built with the model-free builder (tests/builds_without_a_model.py): vectors are seeded by
the bytes, so "searchable with its id" is checked by searching a version for each image's own vector.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from image_search import segments
from image_search.artifact import load_artifact
from image_search.commit_lock import acquire
from image_search.segments import read_current_version
from image_search.storage import LocalStore, Store, StoreError
from index_builder.build import STOP_AT_ENV
from index_builder.cli import main as builder_main
from serve_app.writes.commit import INTENTS, Committer, keys_under
from serve_app.writes.errors import StoreFull, WriteFailed, WriterBusy
from serve_app.writes.plan import Put, Remove
from tests.builds_without_a_model import fake_build, vector_of
from tests.conftest import REPO_ROOT
from tests.support import write_image_folder


def put(key: str, data: bytes, with_vector: bool = True) -> Put:
    return Put(key, data, hashlib.sha256(data).hexdigest(), vector_of(data) if with_vector else None)


def embed(items: Sequence[bytes]) -> list[np.ndarray | None]:
    return [None if data.startswith(b"BROKEN") else vector_of(data) for data in items]


class FullDisk:
    """The collection store, but every write fails the way a full disk does (ENOSPC) while `full`."""

    def __init__(self, inner: LocalStore) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.full = True

    def write_bytes(self, key: str, data: bytes) -> None:
        if self.full:
            raise StoreError(f"cannot write {key}: No space left on device") from OSError(errno.ENOSPC, "full")
        self.inner.write_bytes(key, data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    images, index = tmp_path / "images", tmp_path / "index"
    images.mkdir()
    for i in range(4):
        (images / f"seed{i}.jpg").write_bytes(f"seed image {i}".encode())
    fake_build(images, index)
    return images, index


def committer(index: Path, images: Store | None = None, holder: str = "the test Writer") -> Committer:
    store = images or LocalStore(index.parent / "images")
    return Committer(LocalStore(index), lambda version: store, embed, holder, lock_wait_s=0, lock_lease_s=60)


def served(index: Path) -> dict[str, int]:
    artifact = load_artifact(LocalStore(index), cache_dir=index.parent / "cache")
    records = {record.key: record.id for record in artifact.manifest.records}
    # Every live record is found by its own vector (the bytes in the store decide the vector).
    for record in artifact.manifest.records:
        data = (index.parent / "images" / record.key).read_bytes()
        assert hashlib.sha256(data).hexdigest() == record.sha256, record.key
        _, ids = artifact.index.search(vector_of(data)[None, :], 1)
        assert ids[0][0] == record.id, record.key
    return records


def test_a_batch_stores_its_bytes_and_publishes_one_segment_with_deletions(roots: tuple[Path, Path]) -> None:
    images, index = roots
    before = read_current_version(LocalStore(index))
    assert before is not None
    ids = served(index)
    result = committer(index).commit(
        [
            put("new/a.jpg", b"A"),
            put("seed1.jpg", b"seed1 edited"),
            put("seed2.jpg", b"seed image 2"),
            Remove(ids["seed3.jpg"]),
        ]
    )
    assert [(o.status, o.key) for o in result.outcomes] == [
        ("added", "new/a.jpg"),
        ("replaced", "seed1.jpg"),
        ("unchanged", "seed2.jpg"),
        ("deleted", "seed3.jpg"),
    ]
    assert result.outcomes[0].id == before.next_id and result.outcomes[1].id == ids["seed1.jpg"]
    after = read_current_version(LocalStore(index))
    assert after is not None and after.name == result.version and after.parent == before.name
    assert len(after.segments) == len(before.segments) + 1 and after.segments[-1].count == 2
    assert (images / "new/a.jpg").read_bytes() == b"A" and not (images / "seed3.jpg").exists()
    now = served(index)
    assert now == {
        "new/a.jpg": before.next_id,
        "seed0.jpg": ids["seed0.jpg"],
        "seed1.jpg": ids["seed1.jpg"],
        "seed2.jpg": ids["seed2.jpg"],
    }
    assert keys_under(LocalStore(index), INTENTS) == []
    # The builder agrees with what the writes did: nothing to change, ids unchanged.
    assert fake_build(images, index).version is None


def test_nothing_changed_publishes_nothing(roots: tuple[Path, Path]) -> None:
    _, index = roots
    before = (index / "CURRENT").read_text()
    result = committer(index).commit([put("seed0.jpg", b"seed image 0"), Remove(12345)])
    assert [o.status for o in result.outcomes] == ["unchanged", "not_found"]
    assert result.version == before.strip() and (index / "CURRENT").read_text() == before


def test_a_commit_that_dies_after_storing_bytes_is_finished_by_recovery(
    roots: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    images, index = roots
    ids = served(index)

    def crash(*args: object, **kwargs: object) -> None:
        raise StoreError("the process died here")  # as if killed between the bytes and CURRENT

    monkeypatch.setattr("serve_app.writes.commit.commit_version", crash)
    with pytest.raises(WriteFailed):
        committer(index).commit(
            [put("late.jpg", b"late"), put("BROKEN.jpg", b"BROKEN bytes"), Remove(ids["seed0.jpg"])]
        )
    monkeypatch.undo()
    assert (images / "late.jpg").exists() and not (images / "seed0.jpg").exists()
    assert len(keys_under(LocalStore(index), INTENTS)) == 1

    assert committer(index).recover() == 1  # a new Writer's start: the store is the truth
    now = served(index)
    assert "late.jpg" in now and "seed0.jpg" not in now and "BROKEN.jpg" not in now
    assert not (images / "BROKEN.jpg").exists()  # bytes that do not decode were never acknowledged: removed
    assert now["late.jpg"] >= read_current_version(LocalStore(index)).next_id - 2  # type: ignore[union-attr]
    assert keys_under(LocalStore(index), INTENTS) == []


def test_a_full_disk_answers_store_full_and_loses_nothing_acknowledged(roots: tuple[Path, Path]) -> None:
    images, index = roots
    first = committer(index).commit([put("kept.jpg", b"kept")])
    acknowledged = served(index)
    disk = FullDisk(LocalStore(images))
    writer = committer(index, disk)
    with pytest.raises(StoreFull, match="no space left"):
        writer.commit([put("lost.jpg", b"lost"), Remove(acknowledged["kept.jpg"])])
    assert (index / "CURRENT").read_text().strip() == first.version and served(index) == acknowledged
    assert (images / "kept.jpg").exists() and not (images / "lost.jpg").exists()
    disk.full = False  # space again: the next commit reconciles the failed one's intent, then commits
    result = writer.commit([put("after.jpg", b"after")])
    assert result.outcomes[0].status == "added"
    assert set(served(index)) == set(acknowledged) | {"after.jpg"}
    assert keys_under(LocalStore(index), INTENTS) == []


def test_ids_are_never_given_twice_across_deletes_and_writers(roots: tuple[Path, Path]) -> None:
    _, index = roots
    given: list[int] = []
    for round_ in range(3):
        writer = committer(index)  # a new Writer each round (a restart): next_id comes from the version
        result = writer.commit([put(f"r{round_}.jpg", f"r{round_}".encode())])
        given.append(result.outcomes[0].id)
        writer.commit([Remove(result.outcomes[0].id)])
    assert len(set(given)) == 3 and given == sorted(given)


def test_a_commit_while_a_builder_holds_the_lock_is_refused_naming_it(roots: tuple[Path, Path]) -> None:
    _, index = roots
    lease = acquire(LocalStore(index), "index_builder pid 4242 on box")
    try:
        with pytest.raises(WriterBusy, match="index_builder pid 4242"):
            committer(index).commit([put("x.jpg", b"x")])
    finally:
        lease.release()
    assert committer(index).commit([put("x.jpg", b"x")]).outcomes[0].status == "added"


def test_a_commit_planned_on_a_moved_base_is_planned_again(
    roots: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that ignores the lock publishes between planning and CURRENT: the commit retries on it."""
    images, index = roots
    real = segments.commit_version
    moved: list[str] = []

    def sneaky(store: Store, version: segments.Version, before_pointer: object = None) -> None:
        if not moved:
            (images / "sneaked.jpg").write_bytes(b"sneaked")
            report = fake_build(images, index)  # not through the lock (the test holds none)
            moved.append(str(report.version))
        real(store, version)

    monkeypatch.setattr("serve_app.writes.commit.commit_version", sneaky)
    result = committer(index).commit([put("mine.jpg", b"mine")])
    # The builder indexed mine.jpg too (its bytes were stored): planned again, the write is unchanged
    # under the id the builder gave, and nothing the builder published is hidden.
    assert result.version == moved[0] == (index / "CURRENT").read_text().strip()
    now = served(index)
    assert {"mine.jpg", "sneaked.jpg"} <= set(now) and result.outcomes[0].id == now["mine.jpg"]


# --- CLI builders take the same lock ----------------------------------------------------------------------


@pytest.fixture
def stopped_builder(
    tmp_path: Path, image_folder: Path, tiny_model_dir: Path
) -> Iterator[tuple[list[str], subprocess.Popen[str]]]:
    """A CLI builder stopped (SIGSTOP) in the middle of its publish, holding the lock."""
    images, out = tmp_path / "cli-images", tmp_path / "cli-out"
    shutil.copytree(image_folder, images)
    args = ["--images", str(images), "--out", str(out), "--model", str(tiny_model_dir), "--quiet"]
    assert builder_main(args) == 0
    write_image_folder(images / "more", 2, start_seed=900)
    env = {**os.environ, STOP_AT_ENV: "version-written", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "index_builder", *args]
    builder = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    assert builder.stderr is not None
    seen = ""
    for line in builder.stderr:  # ends when the builder exits: a missed point fails below, never hangs
        seen += line
        if "stopped at version-written" in line:
            break
    assert "stopped at version-written" in seen, seen[-2000:]
    try:
        yield args, builder
    finally:
        builder.send_signal(signal.SIGKILL)
        builder.wait(timeout=60)


def test_two_cli_builders_at_once_one_is_refused_naming_the_holder(
    stopped_builder: tuple[list[str], subprocess.Popen[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    args, builder = stopped_builder
    pid = builder.pid
    assert builder_main(args) == 1
    assert f"index_builder pid {pid}" in capsys.readouterr().err


def test_a_writer_beside_a_cli_builder_is_refused_and_the_builder_beside_a_writer_too(
    stopped_builder: tuple[list[str], subprocess.Popen[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    args, builder = stopped_builder
    pid = builder.pid
    index = Path(args[args.index("--out") + 1])
    images = LocalStore(args[args.index("--images") + 1])
    writer = Committer(LocalStore(index), lambda v: images, embed, "the Writer of image_search", 0, 60)
    with pytest.raises(WriterBusy, match=f"index_builder pid {pid}"):
        writer.commit([put("w.jpg", b"w")])
    builder.send_signal(signal.SIGKILL)  # the builder dies (the kernel drops its lock) ...
    builder.wait(timeout=60)
    lease = acquire(LocalStore(index), "the Writer of image_search pid 1 on box")  # ... and a Writer takes it
    try:
        assert builder_main(args) == 1
        assert "the Writer of image_search" in capsys.readouterr().err
    finally:
        lease.release()
    assert builder_main(args) == 0
