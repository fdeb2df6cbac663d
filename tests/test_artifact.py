"""Opening a published version from a local store: checked, memory-mapped, refused with the reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from image_search.artifact import (
    INDEX_FILE,
    check_artifact,
    list_versions,
    load_manifest,
    open_index,
    read_current,
    version_folder,
)
from image_search.errors import ArtifactError
from image_search.storage import LocalStore


def mapped_files() -> set[str]:
    return {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if len(line.split()) >= 6}


@pytest.fixture
def published(tmp_path: Path, index_dir: Path) -> tuple[LocalStore, str]:
    """A private copy of the session's index (so tests may damage it) and its CURRENT folder."""
    shutil.copytree(index_dir, tmp_path / "index")
    store = LocalStore(tmp_path / "index")
    return store, version_folder(read_current(store))


def test_open_index_maps_the_local_file_and_answers_with_stable_ids(
    published: tuple[LocalStore, str], tmp_path: Path
) -> None:
    store, folder = published
    manifest = check_artifact(store, folder)
    index = open_index(store, folder, manifest, tmp_path / "cache")
    path = store.local_path(f"{folder}/{INDEX_FILE}")
    assert str(path) in mapped_files()  # the codes are mapped, not copied
    assert not (tmp_path / "cache").exists()  # a local store needs no cache
    assert index.ntotal == manifest.count == 24
    vector = index.reconstruct(5)
    _, ids = index.search(vector[None, :], 1)
    assert ids[0, 0] == 5


def test_list_versions_names_the_published_version(published: tuple[LocalStore, str]) -> None:
    store, folder = published
    (info,) = list_versions(store)
    assert version_folder(info.name) == folder and info.published is not None


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flip_byte", "checksum does not match"),
        ("truncate", "checksum does not match"),
        ("remove", "incomplete"),
    ],
)
def test_a_damaged_index_file_is_refused_with_the_reason(
    published: tuple[LocalStore, str], tmp_path: Path, damage: str, message: str
) -> None:
    store, folder = published
    manifest = load_manifest(store, folder)
    path = store.local_path(f"{folder}/{INDEX_FILE}")
    assert path is not None
    data = bytearray(path.read_bytes())
    if damage == "flip_byte":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:100]))
    else:
        path.unlink()
    with pytest.raises(ArtifactError, match=message):
        check_artifact(store, folder)
    with pytest.raises(ArtifactError, match=message):
        open_index(store, folder, manifest, tmp_path / "cache")


def test_a_manifest_that_disagrees_with_its_index_is_refused(published: tuple[LocalStore, str], tmp_path: Path) -> None:
    from dataclasses import replace

    store, folder = published
    manifest = load_manifest(store, folder)
    fewer = replace(manifest, records=manifest.records[:-1])
    with pytest.raises(ArtifactError, match="holds 24 vectors of dim 32, but its manifest lists 23"):
        open_index(store, folder, fewer, tmp_path / "cache")
    assert np.asarray(open_index(store, folder, manifest, tmp_path / "cache").reconstruct(0)).shape == (32,)
