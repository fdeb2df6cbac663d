"""S3 end to end against a real S3-protocol server (moto, server mode, on 127.0.0.1).

Covers the store itself, the builder reading images from and publishing the index to S3, the
pointer-written-last guarantee under a failing store, and a second Serve application that loads its
index from S3 and serves image bytes read from S3.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from image_search.artifact import POINTER, load_artifact, new_version_name, publish, read_current
from image_search.faiss_index import reconstruct_vectors
from image_search.manifest import ImageRecord
from image_search.segments import (
    INDEX_FILE,
    SEGMENT_FILES,
    SEGMENTS,
    VERSION_FILE,
    Version,
    build_segment,
    cache_path,
    open_segment_index,
    read_version,
)
from image_search.storage import CHUNK_BYTES, Entry, S3Store, Store, StoreError, open_store
from tests.conftest import wait_until_ok
from tests.s3_server import S3Server, moto_s3, upload_folder
from tests.support import post_search

BUCKET = "imgsearch-test"
IMAGES = f"s3://{BUCKET}/images"
INDEX = f"s3://{BUCKET}/index"
S3_APP_NAME = "s3_search"
S3_ROUTE = "/s3"


@pytest.fixture(scope="module")
def s3(ray_cluster: None) -> Iterator[S3Server]:
    """The moto server, and this process's environment pointing boto3 at it (restored after).

    It asks for `ray_cluster` first on purpose: Ray's processes inherit the driver's environment at
    `ray.init`, and the endpoint of a server that stops with this module must not leak into them.
    Processes that need it get it through a runtime_env (see `s3_app_url`).
    """
    with moto_s3() as server, pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(name, raising=False)
        for name, value in server.env.items():
            patch.setenv(name, value)
        server.client().create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture(scope="module")
def s3_images(s3: S3Server, image_folder: Path) -> list[str]:
    """The test collection (24 images and one corrupt `notes.jpg`) uploaded to s3://bucket/images."""
    return upload_folder(s3.client(), image_folder, BUCKET, "images")


@pytest.fixture(scope="module")
def s3_index(s3_images: list[str], tiny_model_dir: Path) -> str:
    from index_builder.cli import main

    code = main(["--images", IMAGES, "--out", INDEX, "--model", str(tiny_model_dir), "--quiet"])
    assert code == 0
    return INDEX


# --- the store ------------------------------------------------------------------------------------


def test_s3_store_round_trip(s3: S3Server) -> None:
    store = open_store(f"s3://{BUCKET}/store-test/")
    assert isinstance(store, S3Store)
    assert store.uri == f"s3://{BUCKET}/store-test"
    assert store.local_path("a.txt") is None

    store.write_bytes("a/one.bin", b"one")
    store.write_bytes("a/two.bin", b"two")
    store.write_bytes("ab/three.bin", b"three")
    store.write_bytes("top.bin", b"top")
    assert store.read_bytes("a/one.bin") == b"one"
    assert store.exists("a/two.bin")
    assert not store.exists("a/missing.bin")
    assert not store.exists("a")  # a "folder" is not an object
    assert sorted(store.iter_keys()) == ["a/one.bin", "a/two.bin", "ab/three.bin", "top.bin"]
    # The objects are where the URI says, as seen by an independent client.
    body = s3.client().get_object(Bucket=BUCKET, Key="store-test/a/one.bin")["Body"].read()
    assert body == b"one"

    store.write_bytes("a/one.bin", b"replaced")
    assert store.read_bytes("a/one.bin") == b"replaced"

    store.delete_prefix("a")  # "a/..." only, never "ab/..."
    assert sorted(store.iter_keys()) == ["ab/three.bin", "top.bin"]
    with pytest.raises(StoreError, match="cannot read"):
        store.read_bytes("a/one.bin")


def test_s3_store_refuses_escaping_keys_and_reports_missing_buckets(s3: S3Server) -> None:
    store = open_store(f"s3://{BUCKET}/store-keys")
    for key in ("../outside", "/abs", "", "a/../../b", "back\\slash"):
        with pytest.raises(StoreError, match="invalid key"):
            store.read_bytes(key)
    with pytest.raises(StoreError, match="names no bucket"):
        open_store("s3:///prefix")
    missing = open_store("s3://no-such-bucket/x")
    with pytest.raises(StoreError, match="cannot list"):
        list(missing.iter_keys())
    with pytest.raises(StoreError, match="cannot write"):
        missing.write_bytes("k", b"v")
    assert not missing.exists("k")


def test_s3_store_lists_more_than_one_page(s3: S3Server) -> None:
    store = open_store(f"s3://{BUCKET}/many")
    client = s3.client()
    for i in range(1003):  # list_objects_v2 pages hold 1000 keys
        client.put_object(Bucket=BUCKET, Key=f"many/d/k{i:04d}", Body=b"")
    keys = list(store.iter_keys())
    assert len(keys) == 1003 and keys[0] == "d/k0000" and keys[-1] == "d/k1002"
    store.delete_prefix("d")  # delete_objects takes at most 1000 keys a call: one call per page
    assert list(store.iter_keys()) == []


# --- the builder on S3 ------------------------------------------------------------------------------


def test_builder_reads_images_from_s3_and_publishes_the_index_to_s3(
    s3: S3Server, s3_index: str, manifest: dict, index_dir: Path
) -> None:
    artifact = load_artifact(open_store(s3_index))
    assert artifact.manifest.source == IMAGES
    assert artifact.location.startswith(f"{INDEX}/versions/")
    # Same collection, same model: the same records as the local build, in the same order.
    assert [(r.id, r.key, r.size, r.sha256) for r in artifact.manifest.records] == [
        (r["id"], r["key"], r["size"], r["sha256"]) for r in manifest["records"]
    ]
    assert [s["path"] for s in artifact.manifest.skipped] == ["notes.jpg"]
    local = load_artifact(open_store(str(index_dir)))
    np.testing.assert_allclose(
        reconstruct_vectors(artifact.index, np.arange(24)),
        reconstruct_vectors(local.index, np.arange(24)),
        atol=1e-5,
    )
    keys = {obj["Key"] for obj in s3.client().list_objects_v2(Bucket=BUCKET, Prefix="index/")["Contents"]}
    assert artifact.version is not None
    (segment,) = artifact.version.segments
    assert {
        "index/CURRENT",
        f"index/versions/{artifact.version.name}/{VERSION_FILE}",
        *(f"index/{SEGMENTS}/{segment.name}/{name}" for name in SEGMENT_FILES),
    } <= keys


def test_builder_reports_an_empty_s3_prefix(s3: S3Server, tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from index_builder.cli import main

    code = main(
        ["--images", f"s3://{BUCKET}/nothing-here", "--out", f"s3://{BUCKET}/x", "--model", str(tiny_model_dir)]
    )
    assert code == 1
    assert "no images" in capsys.readouterr().err


# --- publishing: the pointer is written last --------------------------------------------------------


class FailingStore:
    """Delegates to a real store, records every write, and fails the writes `fail_on` picks."""

    def __init__(
        self,
        inner: Store,
        fail_on: Callable[[str], bool] = lambda key: False,
        fail_deletes: bool = False,
    ) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.fail_on = fail_on
        self.fail_deletes = fail_deletes
        self.writes: list[str] = []
        self.delete_attempts: list[str] = []
        self.chunk_reads: list[str] = []

    def read_bytes(self, key: str) -> bytes:
        return self.inner.read_bytes(key)

    def write_bytes(self, key: str, data: bytes) -> None:
        if self.fail_on(key):
            raise StoreError(f"injected failure writing {key}")
        self.inner.write_bytes(key, data)
        self.writes.append(key)

    def write_file(self, key: str, path: Path) -> None:
        if self.fail_on(key):
            raise StoreError(f"injected failure writing {key}")
        self.inner.write_file(key, path)
        self.writes.append(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def iter_keys(self) -> Iterator[str]:
        return self.inner.iter_keys()

    def iter_entries(self) -> Iterator[Entry]:
        return self.inner.iter_entries()

    def iter_chunks(self, key: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        self.chunk_reads.append(key)
        return self.inner.iter_chunks(key, chunk_bytes)

    def delete_prefix(self, prefix: str) -> None:
        self.delete_attempts.append(prefix)
        if self.fail_deletes:
            raise StoreError(f"injected failure deleting {prefix}")
        self.inner.delete_prefix(prefix)

    def local_path(self, key: str) -> Path | None:
        return self.inner.local_path(key)


def _next_version(target: Store, now: float | None = None) -> Version:
    """A small new segment in `target` and a version naming it, planned on what `target` serves now."""
    from image_search.segments import new_segment_name, read_pointer

    records = [ImageRecord(i, f"{i}.jpg", 1, "h") for i in range(4)]
    name = new_segment_name(now)
    segment = build_segment(target, np.arange(4), np.eye(4, dtype=np.float32), records, 4, name=name)
    parent = read_pointer(target)
    return Version(new_version_name(now), "m", "f", 4, {}, "fp32", "/c", (segment,), {}, 4, parent=parent)


@pytest.mark.parametrize("failing_file", [INDEX_FILE, VERSION_FILE, POINTER])
def test_a_failed_publish_leaves_current_and_the_old_version_readable(
    s3: S3Server, failing_file: str, tmp_path: Path
) -> None:
    target = open_store(f"s3://{BUCKET}/publish-{failing_file.lower().replace('.', '-')}")
    old_version = publish(target, _next_version(target))
    old = load_artifact(target, cache_dir=tmp_path / "cache")

    failing = FailingStore(target, fail_on=lambda key: key.endswith(failing_file))
    with pytest.raises(StoreError, match="injected failure"):
        publish(failing, _next_version(failing))

    assert target.read_bytes(POINTER).decode().strip() == old_version
    reloaded = load_artifact(target, cache_dir=tmp_path / "cache")
    assert reloaded.location.endswith(f"versions/{old_version}")
    assert reloaded.manifest == old.manifest


def test_publish_writes_the_pointer_after_every_file_of_the_version(s3: S3Server) -> None:
    recording = FailingStore(open_store(f"s3://{BUCKET}/publish-order"))
    version = _next_version(recording)
    (segment,) = version.segments
    publish(recording, version)
    files = [f"{SEGMENTS}/{segment.name}/{name}" for name in SEGMENT_FILES]
    assert recording.writes == [*files, f"versions/{version.name}/{VERSION_FILE}", POINTER]


# --- opening a segment from S3: downloaded once per node, verified, mapped -------------------------------


def test_a_segment_file_is_downloaded_once_and_a_corrupt_cached_copy_refetched(
    s3: S3Server, s3_index: str, tmp_path: Path
) -> None:
    recording = FailingStore(open_store(s3_index))
    (segment,) = read_version(recording, read_current(recording)).segments
    cache = tmp_path / "cache"
    key = f"{SEGMENTS}/{segment.name}/{INDEX_FILE}"

    first = open_segment_index(recording, segment, cache)
    cached = cache_path(cache, recording, segment.name, INDEX_FILE)
    assert cached.is_file() and recording.chunk_reads == [key]
    assert str(cached) in {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()}
    assert not [p for p in cached.parent.iterdir() if p.name.endswith(".part")]  # no temporary file left

    second = open_segment_index(recording, segment, cache)  # a second replica on the node
    assert len(recording.chunk_reads) == 1  # verified from the cache, not downloaded again
    np.testing.assert_array_equal(second.reconstruct(3), first.reconstruct(3))

    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.unlink()  # the mapped file keeps its inode; the damaged copy is a new file
    cached.write_bytes(bytes(data))
    third = open_segment_index(recording, segment, cache)
    assert len(recording.chunk_reads) == 2  # refused and fetched again
    np.testing.assert_array_equal(third.reconstruct(3), first.reconstruct(3))
    assert sha256_of(cached) == segment.files[INDEX_FILE].sha256


def sha256_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_segment_object_that_does_not_match_its_checksum_is_refused(
    s3: S3Server, s3_index: str, tmp_path: Path
) -> None:
    from dataclasses import replace

    from image_search.errors import ArtifactError
    from image_search.segments import FileInfo

    store = open_store(s3_index)
    (segment,) = read_version(store, read_current(store)).segments
    wrong = replace(segment, files={**segment.files, INDEX_FILE: FileInfo("0" * 64, 1)})
    with pytest.raises(ArtifactError, match="checksum does not match"):
        open_segment_index(store, wrong, tmp_path / "cache")
    assert not cache_path(tmp_path / "cache", store, segment.name, INDEX_FILE).exists()


# --- incremental builds and retention on S3 ---------------------------------------------------------


def test_incremental_build_on_s3_uses_size_and_last_modified(
    s3: S3Server, s3_images: list[str], tiny_model_dir: Path, image_folder: Path, capsys: pytest.CaptureFixture
) -> None:
    from index_builder.cli import main

    client = s3.client()
    upload_folder(client, image_folder, BUCKET, "living")
    images, out = f"s3://{BUCKET}/living", f"s3://{BUCKET}/living-index"
    argv = ["--images", images, "--out", out, "--model", str(tiny_model_dir), "--quiet"]
    assert main(argv) == 0
    before = {r.key: r.id for r in load_artifact(open_store(out)).manifest.records}
    client.delete_object(Bucket=BUCKET, Key="living/img_0002.jpg")
    client.put_object(Bucket=BUCKET, Key="living/extra/new.png", Body=(image_folder / "img_0001.png").read_bytes())
    capsys.readouterr()
    assert main(argv) == 0
    assert "added 1, changed 0, removed 1, moved 0, reused 23" in capsys.readouterr().out
    after = load_artifact(open_store(out)).manifest
    assert after.record(before["img_0002.jpg"]) is None
    assert {r.key: r.id for r in after.records if r.key != "extra/new.png"} == {
        key: image_id for key, image_id in before.items() if key != "img_0002.jpg"
    }
    new = next(r for r in after.records if r.key == "extra/new.png")
    # Its LastModified is recorded, unless it was less than S3's 2 s granularity old when the build
    # read it (uploaded just now): then it is not trusted and the next build hashes it (diff.py).
    modified = client.head_object(Bucket=BUCKET, Key="living/extra/new.png")["LastModified"]
    assert new.id == 24 and new.mtime_ns in (None, int(modified.timestamp()) * 1_000_000_000)


def test_a_failing_s3_delete_is_a_warning_after_current_is_written(
    s3: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from image_search.artifact import RetentionPolicy, list_versions

    target = open_store(f"s3://{BUCKET}/retention-failing")
    policy = RetentionPolicy(retention_s=0, keep_versions=2, segment_grace_s=0)
    old = [
        publish(target, _next_version(target, 1_700_000_000.0 + i), policy, now=1_700_000_000.0 + i) for i in range(2)
    ]
    failing = FailingStore(target, fail_deletes=True)
    with caplog.at_level(logging.WARNING, logger="image_search.artifact"):
        newest = publish(failing, _next_version(failing, 1_700_000_100.0), policy, now=1_700_000_100.0)
    assert target.read_bytes(POINTER).decode().strip() == newest
    assert f"could not delete old index version {old[0]}" in caplog.text
    assert [v.name for v in list_versions(target)] == [*old, newest]
    last = publish(
        target, _next_version(target, 1_700_000_200.0), policy, now=1_700_000_200.0
    )  # a working store prunes
    assert len(list_versions(target)) == 2
    # Retention by reference: only the segments of the two kept versions are left.
    kept = {s.name for name in (newest, last) for s in read_version(target, name).segments}
    left = {key.split("/")[1] for key in target.iter_keys() if key.startswith(f"{SEGMENTS}/")}
    assert left == kept


# --- serving from S3 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_app_url(s3: S3Server, s3_index: str, serve_port: int, tiny_model_dir: Path) -> Iterator[str]:
    """A second application on the shared Serve instance, with its index and images on S3.

    Serve replicas are Ray worker processes started long before this module's moto server; they get
    its endpoint and credentials from a runtime_env. `serve.run` gives an application the runtime_env
    of the code that calls it (`ray.get_runtime_context().runtime_env`), so the application is
    deployed from a Ray task that carries the S3 environment: every replica inherits it, and the
    rest of the session's processes never see it.
    """
    import ray
    from ray import serve

    args = {
        "model": str(tiny_model_dir),
        "index": s3_index,
        "embedder": {"num_threads": 1},
        "limits": {"max_files": 8, "max_file_bytes": 2_000_000, "max_request_bytes": 6_000_000},
    }

    def deploy(app_args: dict[str, Any]) -> str:
        from ray import serve

        from serve_app.app import build_app
        from serve_app.config import AppArgs

        serve.run(build_app(AppArgs.model_validate(app_args)), name=S3_APP_NAME, route_prefix=S3_ROUTE, blocking=False)
        return str(ray.get_runtime_context().runtime_env.get("env_vars", {}).get("AWS_ENDPOINT_URL"))

    deployer = ray.remote(num_cpus=0, runtime_env={"env_vars": s3.env})(deploy)
    assert ray.get(deployer.remote(args), timeout=180) == s3.endpoint_url
    base = f"http://127.0.0.1:{serve_port}{S3_ROUTE}"
    wait_until_ok(f"{base}/healthz")
    yield base
    serve.delete(S3_APP_NAME)


def test_served_app_searches_an_index_held_on_s3(s3_app_url: str, s3_index: str, image_folder: Path) -> None:
    manifest = load_artifact(open_store(s3_index)).manifest
    info = requests.get(f"{s3_app_url}/info", timeout=30).json()
    assert info["index_size"] == manifest.count == 24
    assert info["index_version"] in load_artifact(open_store(s3_index)).location

    for expected_id in (0, 5, 23):
        record = manifest.record(expected_id)
        assert record is not None
        path = image_folder / record.key
        response = post_search(s3_app_url, [(path.name, path.read_bytes())], {"k": 3})
        assert response.status_code == 200, response.text
        top = response.json()["results"][0]["matches"][0]
        assert top["id"] == expected_id
        assert top["path"] == record.key
        assert top["score"] >= 0.99
        # The app is mounted at /s3: its match URLs carry the prefix, and they resolve.
        assert top["url"] == f"/s3/images/{expected_id}"
        assert top["thumbnail_url"] == f"/s3/images/{expected_id}?size=256"
        origin = s3_app_url.removesuffix("/s3")
        assert requests.get(origin + top["thumbnail_url"], timeout=30).status_code == 200


def test_served_app_streams_image_bytes_from_s3(s3: S3Server, s3_app_url: str, s3_index: str) -> None:
    manifest = load_artifact(open_store(s3_index)).manifest
    assert manifest.source == IMAGES
    client = s3.client()
    for image_id in (0, 1, 12):
        record = manifest.record(image_id)
        assert record is not None
        response = requests.get(f"{s3_app_url}/images/{image_id}", timeout=30)
        assert response.status_code == 200
        s3_bytes = client.get_object(Bucket=BUCKET, Key=f"images/{record.key}")["Body"].read()
        assert response.content == s3_bytes
        expected_type = "image/png" if record.key.endswith(".png") else "image/jpeg"
        assert response.headers["content-type"] == expected_type
        # Served through the Ingress: never a redirect to (or a presigned URL of) the bucket.
        assert not response.history

    thumb = requests.get(f"{s3_app_url}/images/3", params={"size": 128}, timeout=30)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    missing = requests.get(f"{s3_app_url}/images/24", timeout=30)
    assert missing.status_code == 404
    assert json.loads(missing.text)["error"]["code"]


def test_ray_engine_reads_images_from_s3(
    s3: S3Server, s3_images: list[str], s3_index: str, tiny_model_dir: Path
) -> None:
    """`--engine ray` on s3:// (pyarrow's S3 filesystem in the read tasks) gives the local engine's artifact.

    Run as a Ray task carrying the S3 environment: the driver code and every task and actor it starts
    (Ray Data's read tasks, the encoder actors) inherit that runtime_env, as a cluster's nodes would
    have their instance profile.
    """
    import ray

    out = f"s3://{BUCKET}/index-ray"

    def build(argv: list[str]) -> int:
        from index_builder.cli import main

        return main(argv)

    builder = ray.remote(num_cpus=0, runtime_env={"env_vars": s3.env})(build)
    argv = ["--images", IMAGES, "--out", out, "--model", str(tiny_model_dir), "--quiet", "--engine", "ray"]
    assert ray.get(builder.remote([*argv, "--batch-size", "7"]), timeout=300) == 0

    ray_built = load_artifact(open_store(out))
    local = load_artifact(open_store(s3_index))
    assert ray_built.manifest.source == IMAGES

    # Stat data aside: a stamp newer than S3's 2 s granularity when a build reads it is not recorded.
    def content(records: tuple) -> list[tuple[int, str, int, str]]:
        return [(r.id, r.key, r.size, r.sha256) for r in records]

    assert content(ray_built.manifest.records) == content(local.manifest.records)
    assert ray_built.manifest.skipped == local.manifest.skipped
    np.testing.assert_allclose(
        reconstruct_vectors(ray_built.index, np.arange(24)),
        reconstruct_vectors(local.index, np.arange(24)),
        atol=1e-5,
    )
