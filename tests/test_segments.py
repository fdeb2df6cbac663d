"""The v3 format: segments and version files round-trip, are checked, and refuse what they cannot read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from image_search.errors import ArtifactError
from image_search.manifest import ImageRecord
from image_search.segments import (
    FORMAT_VERSION,
    RECORDS_FILE,
    VECTORS_FILE,
    LegacyFormatError,
    Version,
    build_segment,
    commit_version,
    live_records,
    open_segment_index,
    open_segment_vectors,
    read_current_version,
    read_segment_records,
    read_version,
    segment_folder,
    version_file,
    with_changes,
)
from image_search.storage import LocalStore

DIM = 4


def make(store: LocalStore, ids: list[int]):  # type: ignore[no-untyped-def]
    vectors = np.eye(DIM, dtype=np.float32)[[i % DIM for i in ids]]
    records = [ImageRecord(i, f"img{i}.jpg", 10 + i, f"{i:02d}") for i in ids]
    return build_segment(store, np.array(ids), vectors, records, DIM), vectors, records


def first_version(segments, next_id: int) -> Version:  # type: ignore[no-untyped-def]
    return Version("v1", "m", "fp", DIM, {"size": 224}, "fp32", "/images", tuple(segments), {}, next_id)


def test_segment_and_version_round_trip(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "index")
    segment, vectors, records = make(store, [0, 1, 2])
    assert read_current_version(store) is None  # nothing published yet
    version = first_version([segment], 3)
    commit_version(store, version)
    assert read_current_version(store) == version
    assert Version.from_json(version.to_json()) == version
    assert read_segment_records(store, segment) == tuple(records)
    np.testing.assert_array_equal(open_segment_vectors(store, segment, tmp_path / "cache"), vectors)
    index = open_segment_index(store, segment, tmp_path / "cache")
    assert index.ntotal == 3
    assert index.search(vectors[1:2], 1)[1][0, 0] == 1  # stable ids, not positions
    assert json.loads((tmp_path / "index" / version_file("v1")).read_text())["format_version"] == FORMAT_VERSION


def test_deletions_and_overrides_make_the_live_records(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "index")
    old, _, _ = make(store, [0, 1, 2])
    new, _, _ = make(store, [1])  # id 1 edited: its new vector lives in the new segment
    moved = ImageRecord(2, "moved/img2.jpg", 12, "02")
    version = with_changes(first_version([old], 3), name="v2", add=[new], delete={old.name: [0, 1]}, overrides=[moved])
    assert version.parent == "v1" and version.live_count == 2 and version.deleted_ids(old.name) == (0, 1)
    records = {s.name: read_segment_records(store, s) for s in version.segments}
    assert [(r.id, r.key) for r in live_records(version, records)] == [(1, "img1.jpg"), (2, "moved/img2.jpg")]
    # Dropping a segment drops its deletions with it.
    assert with_changes(version, name="v3", drop=[old.name]).deleted == {}


def test_commit_refuses_when_current_moved_from_the_parent(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "index")
    segment, _, _ = make(store, [0])
    base = first_version([segment], 1)
    commit_version(store, base)
    commit_version(store, with_changes(base, name="v2"))
    with pytest.raises(ArtifactError, match="another builder published"):
        commit_version(store, with_changes(base, name="v3"))
    assert read_current_version(store).name == "v2"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format_version=FORMAT_VERSION + 1), "format_version 4 is not supported"),
        (lambda d: d.pop("next_id"), "incomplete"),
        (lambda d: d.update(live_count=99), "live_count 99"),
        (lambda d: d["deleted"].update({"nope": [1]}), "does not list"),
        (lambda d: d["segments"][0]["files"].pop(VECTORS_FILE), "lists files"),
    ],
)
def test_malformed_version_files_are_refused(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    store = LocalStore(tmp_path / "index")
    segment, _, _ = make(store, [0])
    data = json.loads(first_version([segment], 1).to_json())
    mutate(data)
    with pytest.raises(ArtifactError, match=message):
        Version.from_json(json.dumps(data))


def test_a_damaged_segment_file_fails_its_checksum(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "index")
    segment, _, _ = make(store, [0, 1])
    path = tmp_path / "index" / segment_folder(segment.name) / RECORDS_FILE
    path.write_text(path.read_text().replace("img1", "imgX"))
    with pytest.raises(ArtifactError, match="checksum"):
        read_segment_records(store, segment)


def test_a_format_2_index_is_refused_with_the_rebuild_command(tmp_path: Path) -> None:
    root = tmp_path / "index"
    (root / "versions" / "old").mkdir(parents=True)
    (root / "versions" / "old" / "manifest.json").write_text("{}")
    (root / "CURRENT").write_text("old\n")
    with pytest.raises(LegacyFormatError, match=r"format 2.*--full"):
        read_current_version(LocalStore(root))
    with pytest.raises(LegacyFormatError):
        read_version(LocalStore(root), "old")


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim))
    vectors = centres[rng.integers(0, 40, n)] + 0.35 * rng.standard_normal((n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_an_approximate_segment_is_tuned_to_the_recall_target_and_says_so(tmp_path: Path) -> None:
    from image_search.index_spec import IndexSpec
    from image_search.segments import build_segment

    n, dim = 6000, 32
    vectors = clustered(n, dim)
    ids = np.arange(100, 100 + n, dtype=np.int64)
    records = [ImageRecord(int(i), f"k{i}.jpg", 1, "0" * 64) for i in ids]
    info = build_segment(LocalStore(tmp_path), ids, vectors, records, dim, IndexSpec("IVF64,Flat", {"nprobe": 1}))
    tuning = info.index["params"]["tuning"]
    assert tuning["met"] and tuning["lower_bound"] >= 0.95
    assert info.index["params"]["nprobe"] == tuning["value"] > 1  # nprobe 1 was not enough on this data


def test_an_exact_segment_needs_no_tuning(tmp_path: Path) -> None:
    from image_search.index_spec import IndexSpec
    from image_search.segments import build_segment

    vectors = clustered(200, 16)
    ids = np.arange(200, dtype=np.int64)
    records = [ImageRecord(int(i), f"k{i}.jpg", 1, "0" * 64) for i in ids]
    info = build_segment(LocalStore(tmp_path), ids, vectors, records, 16, IndexSpec("Flat"))
    assert "tuning" not in info.index["params"]
