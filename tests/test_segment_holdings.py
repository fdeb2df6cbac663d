"""Replicas keep segments across versions: a new version loads only what is new (issue 16 item 4).

The Searcher's holdings (serve_app/deployments/searcher.py `SegmentHoldings`) and the Ingress's
record lookups (serve_app/served_index.py, serve_app/version_records.py) on real format-3 indexes
written by the real builder (with vectors made from the files' bytes, so no model is needed), and
the node cache of S3 segments pruned against the moto S3 server.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from image_search.artifact import RetentionPolicy
from image_search.merge_policy import MergePolicy
from image_search.segments import read_current_version, read_version
from image_search.storage import LocalStore, S3Store
from serve_app.config import SearcherOptions
from serve_app.deployments.searcher import SegmentHoldings
from serve_app.segment_cache import SegmentCache, segment_cache_root
from serve_app.served_index import ServedIndex
from tests.builds_without_a_model import DIM, MODEL, RecordingStore, fake_build, vector_of
from tests.s3_server import S3Server, moto_s3

NO_MERGES = MergePolicy(segments_per_tier=50, max_merge_at_once=50, max_deleted_fraction=1.0)
KEEP_ALL = RetentionPolicy(retention_s=10**9, keep_versions=100)
IDENTITY = {
    "model": MODEL.name,
    "embedding_dim": DIM,
    "fingerprint": MODEL.fingerprint,
    "preprocessing": MODEL.preprocessing,
}


def write(folder: Path, name: str, salt: str = "") -> bytes:
    data = f"{name}{salt}".encode() * 3
    (folder / name).write_bytes(data)
    return data


def publish(images: Path, root: Path | str, store: S3Store | None = None, **options: object) -> str:
    report = fake_build(images, root, merge_policy=NO_MERGES, out_store=store, **options)  # type: ignore[arg-type]
    assert report.version is not None
    return report.version


def top_id(holdings: SegmentHoldings, version: str, data: bytes) -> int:
    from image_search.segment_search import search_segments

    loaded = asyncio.run(holdings.get(version))
    _, ids = search_segments(loaded.segments, vector_of(data)[None, :], 1)
    return int(ids[0, 0])


def id_of(root: Path, version: str, key: str) -> int:
    from image_search.artifact import load_artifact

    (record,) = [r for r in load_artifact(LocalStore(root), version).manifest.records if r.key == key]
    return record.id


def test_a_version_that_adds_one_segment_makes_a_searcher_load_that_segment_only(tmp_path: Path) -> None:
    images, root = tmp_path / "images", tmp_path / "index"
    images.mkdir()
    for i in range(10):
        write(images, f"{i}.jpg")
    v1 = publish(images, root)
    holdings = SegmentHoldings(LocalStore(root), SearcherOptions(), tmp_path / "cache")
    assert asyncio.run(holdings.get(v1)).count == 10
    (first,) = read_version(LocalStore(root), v1).segment_names
    assert holdings.segment_loads == [first]

    added = write(images, "new.jpg")
    v2 = publish(images, root)
    (second,) = set(read_version(LocalStore(root), v2).segment_names) - {first}
    assert asyncio.run(holdings.get(v2)).count == 11
    assert holdings.segment_loads == [first, second]  # the first segment is not loaded again
    assert holdings.version_reads == [v1, v2]
    assert top_id(holdings, v2, added) == id_of(root, v2, "new.jpg")

    # A removal is a new version file only: no segment loads, and the dead id is filtered in the scan.
    gone = (images / "3.jpg").read_bytes()
    gone_id = id_of(root, v2, "3.jpg")
    (images / "3.jpg").unlink()
    v3 = publish(images, root)
    assert asyncio.run(holdings.get(v3)).count == 10
    assert holdings.segment_loads == [first, second]
    assert top_id(holdings, v3, gone) != gone_id
    assert top_id(holdings, v2, gone) == gone_id  # the older version, still held, still has it


def test_segments_no_held_version_names_are_dropped(tmp_path: Path) -> None:
    images, root = tmp_path / "images", tmp_path / "index"
    images.mkdir()
    for i in range(6):
        write(images, f"{i}.jpg")
    v1 = publish(images, root)
    write(images, "a.jpg")
    v2 = publish(images, root)
    holdings = SegmentHoldings(LocalStore(root), SearcherOptions(max_versions=2), tmp_path / "cache")
    asyncio.run(holdings.get(v1))
    asyncio.run(holdings.get(v2))
    old_segments = set(read_version(LocalStore(root), v2).segment_names)
    assert set(holdings.versions.segment_names()) == old_segments

    v3 = publish(images, root, compact=True)  # one merged segment replaces both
    (merged,) = read_version(LocalStore(root), v3).segment_names
    write(images, "b.jpg")
    v4 = publish(images, root)
    asyncio.run(holdings.get(v3))
    assert set(holdings.versions.segment_names()) == old_segments | {merged}  # v2 is still held
    asyncio.run(holdings.get(v4))  # v2 is dropped, and with it the segments only it named
    assert holdings.names() == [v3, v4]
    assert set(holdings.versions.segment_names()) == set(read_version(LocalStore(root), v4).segment_names)
    assert not old_segments & set(holdings.versions.segment_names())


def test_the_ingress_builds_record_lookups_per_segment_and_reuses_them(tmp_path: Path) -> None:
    images, root = tmp_path / "images", tmp_path / "index"
    images.mkdir()
    for i in range(8):
        write(images, f"{i}.jpg")
    v1 = publish(images, root, retention=KEEP_ALL)
    store = RecordingStore(LocalStore(root))
    counts = {v1: 8}

    async def prepare_searcher(name: str) -> int:
        return counts[name]

    served = ServedIndex(store, IDENTITY, prepare_searcher, None)
    asyncio.run(served.start())
    assert served.current.name == v1
    removed_id = id_of(root, v1, "2.jpg")
    edited_id = id_of(root, v1, "5.jpg")
    (images / "2.jpg").unlink()
    write(images, "5.jpg", salt="edited")
    write(images, "new.jpg")
    v2 = publish(images, root, retention=KEEP_ALL)
    counts[v2] = 8
    store.reads.clear()

    version = asyncio.run(served.prepare(v2))
    reads = [key for key in store.reads if key.endswith("records.json")]
    (new_segment,) = set(read_version(LocalStore(root), v2).segment_names) - set(
        read_version(LocalStore(root), v1).segment_names
    )
    assert reads == [f"segments/{new_segment}/records.json"]  # the old segment's records are reused
    records = version.manifest
    assert records.count == 8 and records.source == served.current.manifest.source
    assert records.record(removed_id) is None
    edited = records.record(edited_id)
    assert edited is not None and edited.key == "5.jpg"
    assert edited.sha256 != served.current.manifest.record(edited_id).sha256  # type: ignore[union-attr]
    new = records.record(id_of(root, v2, "new.jpg"))
    assert new is not None and new.key == "new.jpg"
    assert served.current.manifest.record(removed_id) is not None  # v1's lookup is unchanged


def test_a_version_of_another_model_is_refused_before_its_segments_load(tmp_path: Path) -> None:
    from image_search.errors import ArtifactError

    images, root = tmp_path / "images", tmp_path / "index"
    images.mkdir()
    write(images, "0.jpg")
    publish(images, root)
    store = RecordingStore(LocalStore(root))

    async def prepare_searcher(name: str) -> int:
        raise AssertionError("the Searcher is not asked for a refused version")

    served = ServedIndex(store, {**IDENTITY, "fingerprint": "another"}, prepare_searcher, None)
    with pytest.raises(ArtifactError, match="passes its checks"):
        asyncio.run(served.start())
    assert not [key for key in store.reads if key.startswith("segments/")]


# --- the node cache of S3 segments ------------------------------------------------------------------------

BUCKET = "segment-cache"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with moto_s3() as server:
        server.client().create_bucket(Bucket=BUCKET)
        yield server


def test_the_s3_segment_cache_drops_segments_no_retained_version_uses(s3: S3Server, tmp_path: Path) -> None:
    images, cache_dir = tmp_path / "images", tmp_path / "cache"
    images.mkdir()
    store = S3Store(f"s3://{BUCKET}/index", client=s3.client())
    # Retention keeps CURRENT and the one before it; unreferenced segments go at once.
    retention = RetentionPolicy(retention_s=0, keep_versions=2, segment_grace_s=0)
    for i in range(4):
        write(images, f"{i}.jpg")
    v1 = publish(images, f"s3://{BUCKET}/index", store=store, retention=retention)
    write(images, "a.jpg")
    v2 = publish(images, f"s3://{BUCKET}/index", store=store, retention=retention)
    holdings = SegmentHoldings(store, SearcherOptions(max_versions=2), cache_dir, cache_grace_s=0)
    asyncio.run(holdings.get(v1))
    asyncio.run(holdings.get(v2))
    first_segments = set(read_version(store, v2).segment_names)
    cache = SegmentCache(store, cache_dir, grace_s=0)
    assert set(cache.cached()) == first_segments

    v3 = publish(images, f"s3://{BUCKET}/index", store=store, retention=retention, compact=True)
    write(images, "b.jpg")
    v4 = publish(images, f"s3://{BUCKET}/index", store=store, retention=retention)
    current = read_current_version(store)
    assert current is not None and current.name == v4
    retained = set(read_version(store, v3).segment_names) | set(current.segment_names)
    assert not first_segments & retained  # the store no longer names them

    # v2 is still held here: its segments stay cached although the store deleted them.
    assert asyncio.run(load_then_prune(holdings, v3)) == []
    assert first_segments <= set(cache.cached())
    # v2 dropped: now nothing uses them.
    assert set(asyncio.run(load_then_prune(holdings, v4))) == first_segments
    assert set(cache.cached()) == retained
    assert segment_cache_root(cache_dir, store).is_dir()
    # What is still cached still verifies and serves.
    fresh = SegmentHoldings(store, SearcherOptions(), cache_dir)
    assert asyncio.run(fresh.get(v4)).count == 6


async def load_then_prune(holdings: SegmentHoldings, version: str) -> list[str]:
    """Load `version` and wait for the cache pruning its load started (in the background)."""
    await holdings.get(version)
    assert holdings.pruning is not None
    return await holdings.pruning


def test_a_young_cached_segment_is_never_pruned(s3: S3Server, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    store = S3Store(f"s3://{BUCKET}/young", client=s3.client())
    stray = segment_cache_root(cache_dir, store) / "seg-just-downloaded"
    stray.mkdir(parents=True)
    (stray / "index.faiss").write_bytes(np.zeros(4, dtype=np.float32).tobytes())
    images = tmp_path / "images"
    images.mkdir()
    write(images, "0.jpg")
    publish(images, f"s3://{BUCKET}/young", store=store)
    assert SegmentCache(store, cache_dir, grace_s=600).prune(keep=set()) == []
    assert SegmentCache(store, cache_dir, grace_s=0).prune(keep=set()) == ["seg-just-downloaded"]
    assert not stray.exists()
    shutil.rmtree(cache_dir)


def test_the_ingress_builds_record_lookups_off_its_event_loop(tmp_path: Path) -> None:
    import threading

    images, root = tmp_path / "images", tmp_path / "index"
    images.mkdir()
    write(images, "0.jpg")
    v1 = publish(images, root)

    async def prepare_searcher(name: str) -> int:
        return 1

    served = ServedIndex(LocalStore(root), IDENTITY, prepare_searcher, None)
    threads: list[threading.Thread] = []
    load = served.records.segments.load

    def recording(info):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread())
        return load(info)

    served.records.segments.load = recording
    assert asyncio.run(served.start()).name == v1
    assert threads and threading.main_thread() not in threads
