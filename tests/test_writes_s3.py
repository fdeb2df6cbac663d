"""Writes and the commit lock on the S3 test server (moto): the Writer's commit and recovery, a CLI builder refused."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from image_search.artifact import load_artifact
from image_search.commit_lock import LEASE_KEY, LockBusy, acquire
from image_search.segments import read_pointer
from image_search.storage import S3Store, StoreError
from index_builder.cli import main as builder_main
from serve_app.writes.commit import INTENTS, Committer, keys_under
from serve_app.writes.errors import WriteFailed, WriterBusy
from serve_app.writes.plan import Remove
from tests.builds_without_a_model import fake_build
from tests.living import poll
from tests.s3_server import S3Server, moto_s3, upload_folder
from tests.test_writes_commit import embed, put

BUCKET = "writes-test"


@pytest.fixture(scope="module")
def s3(ray_cluster: None) -> Iterator[S3Server]:
    """The moto server and this process's environment pointing boto3 at it (after Ray started, as test_s3 does)."""
    with moto_s3() as server, pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(name, raising=False)
        for name, value in server.env.items():
            patch.setenv(name, value)
        server.client().create_bucket(Bucket=BUCKET)
        yield server


def roots(s3: S3Server, tmp_path: Path, name: str) -> tuple[S3Store, S3Store]:
    folder = tmp_path / "seed"
    folder.mkdir()
    for i in range(3):
        (folder / f"seed{i}.jpg").write_bytes(f"s3 seed {i}".encode())
    upload_folder(s3.client(), folder, BUCKET, f"{name}/images")
    images, index = S3Store(f"s3://{BUCKET}/{name}/images"), S3Store(f"s3://{BUCKET}/{name}/index")
    assert fake_build(images.uri, index.uri).version is not None
    return images, index


def test_the_writer_commits_to_s3_and_recovers_a_commit_cut_short(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, index = roots(s3, tmp_path, "commit")

    def writer() -> Committer:
        return Committer(index, lambda version: images, embed, "the Writer", lock_wait_s=0, lock_lease_s=60)

    ids = {r.key: r.id for r in load_artifact(index, cache_dir=tmp_path / "c1").manifest.records}
    result = writer().commit([put("new/a.jpg", b"A"), Remove(ids["seed0.jpg"])])
    assert [o.status for o in result.outcomes] == ["added", "deleted"]
    assert images.read_bytes("new/a.jpg") == b"A" and not images.exists("seed0.jpg")

    def crash(*args: object, **kwargs: object) -> None:
        raise StoreError("the process died here")

    monkeypatch.setattr("serve_app.writes.commit.commit_version", crash)
    with pytest.raises(WriteFailed):
        writer().commit([put("late.jpg", b"late")])
    monkeypatch.undo()
    assert len(keys_under(index, INTENTS)) == 1 and images.exists("late.jpg")
    assert writer().recover() == 1
    served = {r.key for r in load_artifact(index, cache_dir=tmp_path / "c2").manifest.records}
    assert served == {"new/a.jpg", "late.jpg", "seed1.jpg", "seed2.jpg"} and keys_under(index, INTENTS) == []


def test_on_s3_a_builder_and_the_writer_are_refused_while_the_other_holds_the_lease(
    s3: S3Server, tmp_path: Path, tiny_model_dir: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    upload_folder(s3.client(), image_folder, BUCKET, "cli/images")
    args = ["--images", f"s3://{BUCKET}/cli/images", "--out", f"s3://{BUCKET}/cli/index"]
    args += ["--model", str(tiny_model_dir), "--quiet"]
    assert builder_main(args) == 0
    index = S3Store(f"s3://{BUCKET}/cli/index")
    lease = acquire(index, "index_builder pid 4242 on box")
    try:
        assert builder_main(args) == 1
        assert "index_builder pid 4242 on box" in capsys.readouterr().err
        writer = Committer(index, lambda v: S3Store(f"s3://{BUCKET}/cli/images"), embed, "the Writer", 0, 60)
        with pytest.raises(WriterBusy, match="index_builder pid 4242"):
            writer.commit([put("x.jpg", b"x")])
    finally:
        lease.release()
    assert builder_main(args) == 0


class LeaseStolenMidCommit:
    """The collection store, but the first image write happens after another process took the lease."""

    def __init__(self, inner: S3Store, s3: S3Server, lease_key: str) -> None:
        self.inner, self.s3, self.lease_key = inner, s3, lease_key
        self.uri = inner.uri
        self.committer: Committer | None = None

    def write_bytes(self, key: str, data: bytes) -> None:
        assert self.committer is not None and self.committer.lease is not None
        body = json.dumps({"holder": "a builder that took over", "expires_at": time.time() + 600}).encode()
        self.s3.client().put_object(Bucket=BUCKET, Key=self.lease_key, Body=body)
        lease: Any = self.committer.lease
        poll(lambda: lease.lost is not None, 30, "the Writer's lease refresher noticing the takeover")
        self.inner.write_bytes(key, data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_a_writer_whose_s3_lease_was_taken_over_during_a_commit_does_not_publish(s3: S3Server, tmp_path: Path) -> None:
    images, index = roots(s3, tmp_path, "stolen")
    before = read_pointer(index)
    stolen = LeaseStolenMidCommit(images, s3, f"stolen/index/{LEASE_KEY}")
    # A short lease (refreshed about every second): a commit is longer than that here.
    writer = Committer(index, lambda version: stolen, embed, "the Writer", lock_wait_s=0, lock_lease_s=3)
    stolen.committer = writer
    with pytest.raises(WriterBusy, match="taken by another writer"):
        writer.commit([put("late.jpg", b"late")])
    assert read_pointer(index) == before  # CURRENT untouched: the new holder's alone
    assert "took over" in s3.client().get_object(Bucket=BUCKET, Key=f"stolen/index/{LEASE_KEY}")["Body"].read().decode()
    assert len(keys_under(index, INTENTS)) == 1  # the next commit under the lease reconciles it


def test_a_builder_whose_s3_lease_was_taken_over_does_not_publish(s3: S3Server, tmp_path: Path) -> None:
    """The builder's lease check runs right before CURRENT (index_builder.build.guarded): a builder
    whose refreshes lost the lease to another writer leaves CURRENT to that writer."""
    images, index = roots(s3, tmp_path, "builder-stolen")
    before = read_pointer(index)
    s3.client().put_object(Bucket=BUCKET, Key="builder-stolen/images/new.jpg", Body=b"a new image")
    lease = acquire(index, "index_builder pid 1 on box", lease_s=3)
    try:
        body = json.dumps({"holder": "a Writer that took over", "expires_at": time.time() + 600}).encode()
        s3.client().put_object(Bucket=BUCKET, Key=f"builder-stolen/index/{LEASE_KEY}", Body=body)
        refreshed: Any = lease  # an S3 lease: its refresher records the loss
        poll(lambda: refreshed.lost is not None, 30, "the builder's lease refresher noticing the takeover")
        with pytest.raises(LockBusy, match="taken by another writer"):
            fake_build(images.uri, index.uri, before_commit=lease.check)
    finally:
        lease.release()
    assert read_pointer(index) == before
    assert (
        "took over"
        in s3.client().get_object(Bucket=BUCKET, Key=f"builder-stolen/index/{LEASE_KEY}")["Body"].read().decode()
    )
