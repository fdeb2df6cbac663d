"""The index builder through its command line (`index_builder.cli.main`), on generated images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from image_search.artifact import load_artifact
from image_search.manifest import ImageRecord
from image_search.precision import host_cpu_flags, resolve_precision
from image_search.storage import LocalStore
from index_builder.cli import main
from tests.support import write_image_folder


def read_manifest(out: Path) -> dict:
    """The published version as one manifest-shaped dict (see artifact.version_manifest)."""
    return json.loads(load_artifact(LocalStore(out)).manifest.to_json())


def content(records: tuple[ImageRecord, ...]) -> list[tuple[int, str, int, str]]:
    return [(r.id, r.key, r.size, r.sha256) for r in records]


def build(images: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["--images", str(images), "--out", str(out), "--model", str(model), "--quiet", *extra])


def test_same_input_twice_gives_same_manifest(tmp_path: Path, image_folder: Path, tiny_model_dir: Path) -> None:
    assert build(image_folder, tmp_path / "a", tiny_model_dir) == 0
    assert build(image_folder, tmp_path / "b", tiny_model_dir) == 0
    first, second = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    first.pop("created_at"), second.pop("created_at")
    assert first == second
    assert first["count"] == 24 and len(first["records"]) == 24


def test_batch_size_changes_no_record_and_vectors_only_by_rounding(
    tmp_path: Path, index_dir: Path, image_folder: Path, tiny_model_dir: Path
) -> None:
    import numpy as np

    assert build(image_folder, tmp_path / "b7", tiny_model_dir, "--batch-size", "7") == 0
    default, small = load_artifact(LocalStore(index_dir)), load_artifact(LocalStore(tmp_path / "b7"))
    # mtime_ns aside: other tests may rewrite a session image with the same bytes.
    assert content(default.manifest.records) == content(small.manifest.records)
    vectors = [artifact.index.reconstruct_n(0, artifact.index.ntotal) for artifact in (default, small)]
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-5)


def test_manifest_records_every_image_with_hash(index_dir: Path, image_folder: Path, manifest: dict) -> None:
    import hashlib

    assert manifest["format_version"] == 3
    assert manifest["embedding_dim"] == 32
    assert manifest["index"]["factory"] == "Flat"
    # The fixture builds with the default precision, auto, resolved on this CPU (bf16 or fp32).
    assert manifest["precision"] == resolve_precision("auto", "cpu", host_cpu_flags())
    assert [r["key"] for r in manifest["records"]] == sorted(r["key"] for r in manifest["records"])
    # A first build numbers the images in key order; next_id is one past the last.
    assert [r["id"] for r in manifest["records"]] == list(range(24)) and manifest["next_id"] == 24
    for record in manifest["records"]:
        data = (image_folder / record["key"]).read_bytes()
        assert record["size"] == len(data)
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        assert isinstance(record["mtime_ns"], int)  # the cheap check of the next build
    artifact = load_artifact(LocalStore(index_dir))
    assert artifact.index.ntotal == 24


def test_non_image_is_skipped_and_reported(
    image_folder: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert build(image_folder, tmp_path / "out", tiny_model_dir) == 0
    captured = capsys.readouterr()
    assert "skipped notes.jpg" in captured.err
    assert "1 skipped" in captured.out
    manifest = read_manifest(tmp_path / "out")
    assert [s["path"] for s in manifest["skipped"]] == ["notes.jpg"]
    assert "notes.jpg" not in {r["key"] for r in manifest["records"]}


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no such folder"),
        ("empty", "no images"),
        ("only_bad", "could be read"),
        ("bad_model", "could not load CLIP checkpoint"),
    ],
)
def test_fails_with_one_line_reason(tmp_path: Path, tiny_model_dir: Path, setup: str, message: str) -> None:
    images = tmp_path / "images"
    model = tiny_model_dir
    if setup != "missing":
        images.mkdir()
    if setup == "only_bad":
        (images / "x.png").write_bytes(b"nope")
    if setup == "bad_model":
        write_image_folder(images, 2)
        model = tmp_path / "no-model-here"
        model.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "index_builder",
            "--images",
            str(images),
            "--out",
            str(tmp_path / "out"),
            "--model",
            str(model),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("index_builder: error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr
    assert not (tmp_path / "out" / "CURRENT").exists()


def test_rebuild_publishes_new_version_and_keeps_old_readable(
    tmp_path: Path, image_folder: Path, tiny_model_dir: Path
) -> None:
    import shutil

    images, out = tmp_path / "images", tmp_path / "out"
    shutil.copytree(image_folder, images)
    assert build(images, out, tiny_model_dir) == 0
    first = (out / "CURRENT").read_text().strip()
    write_image_folder(images / "more", 1, start_seed=500)
    assert build(images, out, tiny_model_dir) == 0
    second = (out / "CURRENT").read_text().strip()
    assert first != second
    assert load_artifact(LocalStore(out), f"versions/{first}").manifest.count == 24
    assert load_artifact(LocalStore(out), f"versions/{second}").manifest.count == 25


def test_rebuild_of_an_unchanged_collection_publishes_nothing(
    tmp_path: Path, image_folder: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert build(image_folder, out, tiny_model_dir) == 0
    first = (out / "CURRENT").read_text().strip()
    capsys.readouterr()
    assert build(image_folder, out, tiny_model_dir) == 0
    printed = capsys.readouterr().out
    assert "added 0, changed 0, removed 0, moved 0, reused 24" in printed
    assert f"nothing changed: 24 images, {out} still serves version {first}" in printed
    assert (out / "CURRENT").read_text().strip() == first
    assert [p.name for p in (out / "versions").iterdir()] == [first]


def test_a_build_that_embeds_nothing_shows_no_progress_bar_and_no_rate(
    tmp_path: Path, image_folder: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    images, out = tmp_path / "images", tmp_path / "out"
    shutil.copytree(image_folder, images)
    (images / "notes.jpg").unlink()  # a skipped file is tried again by every build
    assert build(images, out, tiny_model_dir) == 0
    capsys.readouterr()
    # Without --quiet: the progress bar would be drawn if there were anything to embed.
    assert main(["--images", str(images), "--out", str(out), "--model", str(tiny_model_dir)]) == 0
    captured = capsys.readouterr()
    assert "nothing changed" in captured.out
    assert "images/s" not in captured.out and "img/s" not in captured.err and "0/0" not in captured.err
