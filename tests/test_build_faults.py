"""The builder on storage that fails and on odd files: an I/O error never counts as a deletion
(the build fails with the reason and the published index and its ids stay), a build that would
remove most of the collection refuses, and a file name that is not UTF-8 is skipped with a reason.

Runs as root, where chmod does not stop reads: errors are injected through the store."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from image_search.artifact import load_artifact
from image_search.storage import LocalStore, Store, StoreError
from index_builder import build as build_module
from index_builder.cli import main
from tests.living import manifest_of


def build(images: Path, out: Path, model: Path, *extra: str) -> int:
    # --workers 0: the build reads through the store this process opened (the one the tests replace).
    return main(
        ["--images", str(images), "--out", str(out), "--model", str(model), "--quiet", "--workers", "0", *extra]
    )


@pytest.fixture
def collection(tmp_path: Path, image_folder: Path) -> Path:
    images = tmp_path / "images"
    shutil.copytree(image_folder, images)
    return images


class FailingReads(LocalStore):
    """A folder whose files under `failing` cannot be read (an I/O error, a flaky mount)."""

    failing: tuple[str, ...] = ()

    def _fail(self, key: str) -> None:
        if key.startswith(self.failing):
            raise StoreError(f"cannot read {self._path(key)}: Input/output error")

    def read_bytes(self, key: str) -> bytes:
        self._fail(key)
        return super().read_bytes(key)

    def iter_chunks(self, key: str, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        self._fail(key)
        return super().iter_chunks(key, chunk_bytes)


def failing_source(monkeypatch: pytest.MonkeyPatch, images: Path, *failing: str) -> None:
    """Builds open `images` as a FailingReads store (the index folder stays a plain one)."""
    real_open = build_module.open_store

    def open_store(location: str) -> Store:
        if Path(location).resolve() == images.resolve():
            store = FailingReads(location)
            store.failing = failing
            return store
        return real_open(location)

    monkeypatch.setattr(build_module, "open_store", open_store)


def published_state(out: Path) -> tuple[str, dict[str, int]]:
    artifact = load_artifact(LocalStore(out))
    return (out / "CURRENT").read_text(), {r.key: r.id for r in artifact.manifest.records}


def test_a_folder_that_cannot_be_listed_is_an_error_not_an_empty_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.jpg").write_bytes(b"x")
    (tmp_path / "unlistable").mkdir()
    (tmp_path / "unlistable" / "b.jpg").write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(path: object = ".") -> object:  # what os.walk calls for each folder
        if str(path).endswith("unlistable"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(StoreError, match=r"cannot list .*unlistable: Permission denied"):
        list(LocalStore(tmp_path).iter_entries())


def test_an_unlistable_folder_fails_the_build_and_keeps_every_id(
    collection: Path,
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    assert build(collection, out, tiny_model_dir) == 0
    before = published_state(out)
    real_scandir = os.scandir

    def scandir(path: object = ".") -> object:
        if str(path).endswith("nested"):
            raise OSError(5, "Input/output error", str(path))
        return real_scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    capsys.readouterr()
    assert build(collection, out, tiny_model_dir) == 1
    assert "index_builder: error: cannot list " in capsys.readouterr().err
    assert published_state(out) == before
    monkeypatch.undo()
    assert build(collection, out, tiny_model_dir) == 0  # readable again: nothing changed, same ids
    assert published_state(out) == before


def test_a_touched_file_that_cannot_be_read_fails_the_build(
    collection: Path,
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    assert build(collection, out, tiny_model_dir) == 0
    before = published_state(out)
    touched = collection / "img_0002.jpg"  # same size, new stamp: the build must hash it
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns - 10**10))
    failing_source(monkeypatch, collection, "img_0002.jpg")
    capsys.readouterr()
    assert build(collection, out, tiny_model_dir) == 1
    err = capsys.readouterr().err
    assert "index_builder: error: cannot read " in err and "img_0002.jpg: Input/output error" in err
    assert published_state(out) == before


def test_a_changed_file_that_cannot_be_read_fails_the_build_instead_of_dropping_it(
    collection: Path,
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.support import synthetic_image

    out = tmp_path / "out"
    assert build(collection, out, tiny_model_dir) == 0
    before = published_state(out)
    synthetic_image(901, (300, 200)).save(collection / "img_0001.png")  # other size: to be embedded
    failing_source(monkeypatch, collection, "img_0001.png")
    capsys.readouterr()
    assert build(collection, out, tiny_model_dir) == 1
    err = capsys.readouterr().err
    assert "img_0001.png: Input/output error" in err and "nothing was published" in err
    assert published_state(out) == before
    monkeypatch.undo()
    assert build(collection, out, tiny_model_dir) == 0
    assert published_state(out)[1] == before[1]  # re-embedded under its id


def test_a_build_that_removes_most_of_the_collection_refuses_without_the_flag(
    collection: Path, tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert build(collection, out, tiny_model_dir) == 0
    before = published_state(out)
    shutil.rmtree(collection / "nested")  # 8 of 24
    for path in sorted(collection.glob("img_*"))[:6]:  # and 6 more: 14 of 24 (58%)
        path.unlink()
    capsys.readouterr()
    assert build(collection, out, tiny_model_dir) == 1
    err = capsys.readouterr().err
    assert "would remove 14 of the 24 published images (58%, more than --max-removed-share 0.5)" in err
    assert "--allow-mass-removal" in err
    assert published_state(out) == before
    assert build(collection, out, tiny_model_dir, "--max-removed-share", "0.6") == 0
    assert len(published_state(out)[1]) == 10


def test_the_flag_allows_a_mass_removal(collection: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "out"
    assert build(collection, out, tiny_model_dir) == 0
    for path in sorted(collection.rglob("img_*"))[:20]:
        path.unlink()
    assert build(collection, out, tiny_model_dir) == 1
    assert build(collection, out, tiny_model_dir, "--allow-mass-removal") == 0
    assert len(published_state(out)[1]) == 4


def test_a_file_name_that_is_not_utf8_is_skipped_with_the_reason(
    collection: Path, tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = os.path.join(os.fsencode(collection), b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    with open(odd, "wb") as handle:
        handle.write((collection / "img_0001.png").read_bytes())
    out = tmp_path / "out"
    assert build(collection, out, tiny_model_dir) == 0
    captured = capsys.readouterr()
    assert "skipped caf\\xe9.png: file name is not valid UTF-8" in captured.err
    version = (out / "CURRENT").read_text().strip()
    (out / "versions" / version / "version.json").read_text(encoding="utf-8")  # what the service parses
    manifest = manifest_of(out, version)
    assert {"path": "caf\\xe9.png", "reason": "file name is not valid UTF-8: rename it (to UTF-8) to index it"} in (
        manifest["skipped"]
    )
    keys = [record["key"] for record in manifest["records"]]
    assert len(keys) == 24 and all(key.isascii() for key in keys)
    # Every key of the index goes into a JSON answer as it is.
    json.dumps(keys, ensure_ascii=False).encode("utf-8")
    # The same skipped file the next time is no change: nothing is published.
    assert build(collection, out, tiny_model_dir) == 0
    assert "nothing changed" in capsys.readouterr().out
