"""Opening a published version's segments from a local store: checked, memory-mapped, refused with the reason."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from image_search.artifact import list_versions, read_current, version_folder
from image_search.errors import ArtifactError
from image_search.segments import (
    INDEX_FILE,
    VECTORS_FILE,
    SegmentInfo,
    open_segment_index,
    open_segment_vectors,
    read_version,
    segment_folder,
)
from image_search.storage import LocalStore, StoreError


def mapped_files() -> set[str]:
    return {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if len(line.split()) >= 6}


@pytest.fixture
def published(tmp_path: Path, index_dir: Path) -> tuple[LocalStore, SegmentInfo]:
    """A private copy of the session's index (so tests may damage it) and its one segment."""
    shutil.copytree(index_dir, tmp_path / "index")
    store = LocalStore(tmp_path / "index")
    (segment,) = read_version(store, read_current(store)).segments
    return store, segment


def test_open_segment_index_maps_the_local_file_and_answers_with_stable_ids(
    published: tuple[LocalStore, SegmentInfo], tmp_path: Path
) -> None:
    store, segment = published
    index = open_segment_index(store, segment, tmp_path / "cache")
    path = store.local_path(f"{segment_folder(segment.name)}/{INDEX_FILE}")
    assert str(path) in mapped_files()  # the codes are mapped, not copied
    assert not (tmp_path / "cache").exists()  # a local store needs no cache
    assert index.ntotal == segment.count == 24
    vector = index.reconstruct(5)
    _, ids = index.search(vector[None, :], 1)
    assert ids[0, 0] == 5
    vectors = open_segment_vectors(store, segment, tmp_path / "cache")
    np.testing.assert_array_equal(vectors[5], vector)  # the raw vectors are the indexed ones


def test_list_versions_names_the_published_version(published: tuple[LocalStore, SegmentInfo]) -> None:
    store, _ = published
    (info,) = list_versions(store)
    assert info.name == read_current(store) and info.published is not None
    assert version_folder(info.name) == f"versions/{info.name}"


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        ("flip_byte", ArtifactError, "checksum does not match"),
        ("truncate", ArtifactError, "checksum does not match"),
        ("remove", StoreError, "cannot read"),  # missing: an I/O error, retried, not "broken"
    ],
)
@pytest.mark.parametrize("file", [INDEX_FILE, VECTORS_FILE])
def test_a_damaged_segment_file_is_refused_with_the_reason(
    published: tuple[LocalStore, SegmentInfo], tmp_path: Path, damage: str, error: type, message: str, file: str
) -> None:
    store, segment = published
    path = store.local_path(f"{segment_folder(segment.name)}/{file}")
    assert path is not None
    data = bytearray(path.read_bytes())
    if damage == "flip_byte":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:100]))
    else:
        path.unlink()
    with pytest.raises(error, match=message):
        if file == INDEX_FILE:
            open_segment_index(store, segment, tmp_path / "cache")
        else:
            open_segment_vectors(store, segment, tmp_path / "cache")


def test_a_version_that_disagrees_with_its_segment_is_refused(
    published: tuple[LocalStore, SegmentInfo], tmp_path: Path
) -> None:
    store, segment = published
    with pytest.raises(ArtifactError, match="holds 24 vectors of dim 32, its version lists 23"):
        open_segment_index(store, replace(segment, count=23), tmp_path / "cache")
    assert np.asarray(open_segment_index(store, segment, tmp_path / "cache").reconstruct(0)).shape == (32,)
