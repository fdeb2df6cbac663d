"""`--engine ray` (a Ray Data pipeline) writes the artifact the local engine writes.

Runs on the session's in-process Ray (`ray_cluster`): `run_ray` joins it instead of starting one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from image_search.artifact import load_artifact
from image_search.manifest import ImageRecord
from image_search.storage import open_store
from index_builder.cli import main
from tests.support import write_image_folder


def content(records: tuple[ImageRecord, ...]) -> list[tuple[int, str, int, str]]:
    return [(r.id, r.key, r.size, r.sha256) for r in records]


def build(images: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["--images", str(images), "--out", str(out), "--model", str(model), "--quiet", *extra])


def test_ray_engine_matches_the_local_engine(
    ray_cluster: None,
    image_folder: Path,
    index_dir: Path,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    # A batch size that does not divide the collection, and two actors, so rows arrive out of order.
    code = build(
        image_folder, tmp_path / "ray-index", tiny_model_dir, "--engine", "ray", "--batch-size", "5", "--actors", "2"
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "indexed 24 images (1 skipped)" in captured.out
    assert "skipped notes.jpg:" in captured.err

    local = load_artifact(open_store(str(index_dir)))
    ray_built = load_artifact(open_store(str(tmp_path / "ray-index")))
    # mtime_ns aside: other tests may rewrite a session image with the same bytes.
    assert content(ray_built.manifest.records) == content(local.manifest.records)
    assert ray_built.manifest.skipped == local.manifest.skipped
    for field in ("model", "model_fingerprint", "embedding_dim", "preprocessing", "index", "source", "metric"):
        assert getattr(ray_built.manifest, field) == getattr(local.manifest, field), field
    np.testing.assert_allclose(
        ray_built.index.reconstruct_n(0, ray_built.index.ntotal),
        local.index.reconstruct_n(0, local.index.ntotal),
        atol=1e-5,
    )


def test_ray_engine_skips_and_reports_bad_files(ray_cluster: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    good = write_image_folder(images, 4, start_seed=100)
    (images / "empty.png").write_bytes(b"")
    assert good[0].suffix == ".jpg"
    (images / "nested" / "truncated.jpg").write_bytes(good[0].read_bytes()[:300])
    (images / "text.webp").write_text("not an image at all")
    (images / ".hidden.jpg").write_bytes(b"ignored: hidden files are not collected")

    assert build(images, tmp_path / "out", tiny_model_dir, "--engine", "ray", "--batch-size", "2") == 0
    manifest = load_artifact(open_store(str(tmp_path / "out"))).manifest
    assert [record.key for record in manifest.records] == sorted(p.relative_to(images).as_posix() for p in good)
    skipped = {entry["path"]: entry["reason"] for entry in manifest.skipped}
    assert sorted(skipped) == ["empty.png", "nested/truncated.jpg", "text.webp"]
    assert all(reason for reason in skipped.values())


def test_ray_engine_fails_cleanly_when_nothing_decodes(
    ray_cluster: None, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_text("no")
    (images / "b.png").write_bytes(b"\x89PNG\r\n")
    assert build(images, tmp_path / "out", tiny_model_dir, "--engine", "ray") == 1
    assert "could be read (2 skipped)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "CURRENT").exists()


def test_ray_engine_reports_an_unloadable_model(
    ray_cluster: None, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert build(image_folder, tmp_path / "out", tmp_path / "no-model", "--engine", "ray") == 1
    assert "could not load CLIP checkpoint" in capsys.readouterr().err


def test_ray_engine_builds_incrementally_embedding_only_the_diff(
    ray_cluster: None, image_folder: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    images, out = tmp_path / "images", tmp_path / "out"
    shutil.copytree(image_folder, images)
    assert build(images, out, tiny_model_dir) == 0  # the local engine publishes the first version
    before = {r.key: r.id for r in load_artifact(open_store(str(out))).manifest.records}
    (images / "img_0004.jpg").unlink()
    write_image_folder(images / "new", 1, start_seed=300)
    capsys.readouterr()

    assert build(images, out, tiny_model_dir, "--engine", "ray", "--batch-size", "4") == 0
    assert "added 1, changed 0, removed 1, moved 0, reused 23" in capsys.readouterr().out
    after = load_artifact(open_store(str(out)))
    ids = {r.key: r.id for r in after.manifest.records}
    assert ids.pop("new/nested/img_0300.jpg") == 24
    assert ids == {key: image_id for key, image_id in before.items() if key != "img_0004.jpg"}
    _, found = after.index.search(after.index.reconstruct(24)[None, :], 1)
    assert found[0, 0] == 24
