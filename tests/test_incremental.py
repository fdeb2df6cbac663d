"""Incremental builds through the command line, on real files: counts, stable ids, equality with a full build."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from image_search.artifact import LoadedArtifact, load_artifact
from image_search.faiss_index import reconstruct_vectors
from image_search.manifest import Manifest
from image_search.storage import LocalStore
from index_builder.cli import main
from tests.support import make_clip_checkpoint, synthetic_image, write_image_folder


def build(images: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["--images", str(images), "--out", str(out), "--model", str(model), "--quiet", *extra])


def by_key(artifact: LoadedArtifact) -> dict[str, tuple[int, np.ndarray]]:
    records = artifact.manifest.records
    vectors = reconstruct_vectors(artifact.index, np.array([r.id for r in records], dtype=np.int64))
    return {record.key: (record.id, vector) for record, vector in zip(records, vectors, strict=True)}


@pytest.fixture
def collection(tmp_path: Path, image_folder: Path) -> Path:
    """A private copy of the session's collection (24 images and a broken notes.jpg) to change."""
    images = tmp_path / "images"
    shutil.copytree(image_folder, images)
    return images


def change_collection(images: Path) -> tuple[str, str, list[str]]:
    """Remove one image, rewrite another with new bytes, add two. Returns (removed, changed, added) keys."""
    removed, changed = "img_0001.png", "nested/img_0003.png"
    (images / removed).unlink()
    synthetic_image(900, (333, 251)).save(images / changed)
    added = write_image_folder(images / "new", 2, start_seed=700)
    return removed, changed, sorted(p.relative_to(images).as_posix() for p in added)


def test_incremental_build_embeds_only_what_changed_and_equals_a_full_build(
    collection: Path, tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert build(collection, out, tiny_model_dir) == 0
    before = load_artifact(LocalStore(out))
    ids_before = {r.key: r.id for r in before.manifest.records}
    removed, changed, added = change_collection(collection)
    capsys.readouterr()

    assert build(collection, out, tiny_model_dir) == 0
    printed = capsys.readouterr().out
    assert "added 2, changed 1, removed 1, moved 0, reused 22 in " in printed
    assert "full rebuild" not in printed
    incremental = load_artifact(LocalStore(out))
    ids_after = {r.key: r.id for r in incremental.manifest.records}

    # Kept images (the edited one too) keep their ids; the removed id is gone; new ids are fresh.
    assert {key: ids_after[key] for key in ids_before if key != removed} == {
        key: ids for key, ids in ids_before.items() if key != removed
    }
    assert ids_before[removed] not in ids_after.values()
    assert [ids_after[key] for key in added] == [24, 25] and incremental.manifest.next_id == 26
    assert incremental.manifest.record(ids_before[removed]) is None

    # The same collection built from scratch: same keys, same vectors, same answers.
    assert build(collection, tmp_path / "full", tiny_model_dir) == 0
    full = load_artifact(LocalStore(tmp_path / "full"))
    inc_vectors, full_vectors = by_key(incremental), by_key(full)
    assert sorted(inc_vectors) == sorted(full_vectors)
    for key in full_vectors:
        np.testing.assert_allclose(inc_vectors[key][1], full_vectors[key][1], atol=1e-5, err_msg=key)
    queries = np.stack([vector for _, vector in full_vectors.values()])
    inc_keys = {r.id: r.key for r in incremental.manifest.records}
    full_keys = {r.id: r.key for r in full.manifest.records}
    _, inc_ids = incremental.index.search(queries, 5)
    _, full_ids = full.index.search(queries, 5)
    assert [[inc_keys[i] for i in row] for row in inc_ids] == [[full_keys[i] for i in row] for row in full_ids]
    # The changed image got a new vector: its old one is no longer what the index holds.
    old_changed = by_key(before)[changed][1]
    assert not np.allclose(old_changed, inc_vectors[changed][1], atol=1e-3)


def test_a_touched_file_is_hashed_not_embedded_and_its_new_stamp_is_stored(
    collection: Path,
    tmp_path: Path,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    assert build(collection, out, tiny_model_dir) == 0
    touched = collection / "img_0002.jpg"
    stat = touched.stat()
    new_mtime = stat.st_mtime_ns - 5_000_000_000  # in the past: a stamp the build can trust
    os.utime(touched, ns=(stat.st_atime_ns, new_mtime))
    first = (out / "CURRENT").read_text()
    capsys.readouterr()
    assert build(collection, out, tiny_model_dir) == 0
    printed = capsys.readouterr().out
    assert "added 0, changed 0, removed 0, moved 0, reused 24" in printed
    # The new stamp is recorded (a small version is published for it), ids and vectors unchanged...
    assert (out / "CURRENT").read_text() != first and "nothing changed" not in printed
    after = load_artifact(LocalStore(out)).manifest
    assert {r.key: r.mtime_ns for r in after.records}["img_0002.jpg"] == new_mtime
    assert {r.key: r.id for r in after.records} == {
        r.key: r.id for r in load_artifact(LocalStore(out), f"versions/{first.strip()}").manifest.records
    }
    # ...so the next build reads no file at all, and publishes nothing.
    import image_search.segments
    import index_builder.build

    hashed: list[str] = []
    real_sha256 = image_search.segments.store_sha256
    monkeypatch.setattr(
        index_builder.build, "store_sha256", lambda store, key: hashed.append(key) or real_sha256(store, key)
    )
    assert build(collection, out, tiny_model_dir) == 0
    assert hashed == [] and "nothing changed" in capsys.readouterr().out


def test_a_same_size_rewrite_within_the_stamps_tick_is_re_embedded(
    collection: Path, tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stamp no older than the clock's tick when the build reads the file could be shared by a
    rewrite right after: it is not trusted (recorded as unknown) and the next build hashes the file."""
    out = tmp_path / "out"
    target = collection / "img_0002.jpg"
    same_tick = target.stat().st_mtime_ns + 3_600 * 10**9  # "now" to the builder's clock, and beyond
    os.utime(target, ns=(same_tick, same_tick))
    assert build(collection, out, tiny_model_dir) == 0
    before = load_artifact(LocalStore(out)).manifest
    assert {r.key: r.mtime_ns for r in before.records}["img_0002.jpg"] is None
    old_id = {r.key: r.id for r in before.records}["img_0002.jpg"]
    # Rewritten: other bytes, the same size, the same stamp (as a coarse clock gives it).
    data = bytearray(target.read_bytes())
    rewritten = synthetic_image(4242, (320, 240))
    import io

    buffer = io.BytesIO()
    rewritten.save(buffer, format="JPEG", quality=92)
    new_bytes = buffer.getvalue()[: len(data)].ljust(len(data), b"\0")  # same size (JPEG ignores the tail)
    assert len(new_bytes) == len(data) and new_bytes != bytes(data)
    target.write_bytes(new_bytes)
    os.utime(target, ns=(same_tick, same_tick))
    capsys.readouterr()
    assert build(collection, out, tiny_model_dir) == 0
    assert "added 0, changed 1, removed 0, moved 0, reused 23" in capsys.readouterr().out
    after = load_artifact(LocalStore(out)).manifest
    record = next(r for r in after.records if r.key == "img_0002.jpg")
    import hashlib

    assert (record.id, record.sha256) == (old_id, hashlib.sha256(new_bytes).hexdigest())


def test_a_renamed_folder_keeps_its_ids_and_vectors_and_embeds_nothing(
    collection: Path,
    tmp_path: Path,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    assert build(collection, out, tiny_model_dir) == 0
    before = by_key(load_artifact(LocalStore(out)))
    (collection / "nested").rename(collection / "2024-holiday")
    (collection / "img_0002.jpg").rename(collection / "renamed.jpg")
    moved = {key: "2024-holiday/" + key.removeprefix("nested/") for key in before if key.startswith("nested/")}
    moved["img_0002.jpg"] = "renamed.jpg"
    import index_builder.local_engine

    embedded: list[str] = []
    real_embed = index_builder.local_engine.embed_local

    def counting_embed(store: object, keys: list[str], *args: object, **kwargs: object) -> object:
        embedded.extend(keys)
        return real_embed(store, keys, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(index_builder.local_engine, "embed_local", counting_embed)
    capsys.readouterr()
    assert build(collection, out, tiny_model_dir) == 0
    assert f"added 0, changed 0, removed 0, moved {len(moved)}, reused 24 in " in capsys.readouterr().out
    assert embedded == ["notes.jpg"]  # only the non-image, tried by every build
    after = by_key(load_artifact(LocalStore(out)))
    assert sorted(after) == sorted(moved.get(key, key) for key in before)
    for old_key, (old_id, old_vector) in before.items():
        new_id, new_vector = after[moved.get(old_key, old_key)]
        assert new_id == old_id, old_key
        np.testing.assert_array_equal(new_vector, old_vector)


def test_another_model_forces_a_full_rebuild_that_keeps_ids(
    collection: Path, tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert build(collection, out, tiny_model_dir) == 0
    ids_before = {r.key: r.id for r in load_artifact(LocalStore(out)).manifest.records}
    other_model = make_clip_checkpoint(tmp_path / "other-model", seed=1)
    capsys.readouterr()
    assert build(collection, out, other_model) == 0
    printed = capsys.readouterr().out
    assert "full rebuild of 25 images: the model changed (fingerprint " in printed
    assert "added 0, changed 24, removed 0, moved 0, reused 0" in printed
    rebuilt = load_artifact(LocalStore(out)).manifest
    assert {r.key: r.id for r in rebuilt.records} == ids_before
    assert rebuilt.model == str(other_model)


def test_full_flag_and_other_precision_force_a_full_rebuild(
    collection: Path, tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    # fp32 stated: the default, auto, is bf16 on a CPU with native bf16.
    assert build(collection, out, tiny_model_dir, "--precision", "fp32") == 0
    capsys.readouterr()
    assert build(collection, out, tiny_model_dir, "--full", "--precision", "fp32") == 0
    assert "full rebuild of 25 images: --full was given" in capsys.readouterr().out
    assert build(collection, out, tiny_model_dir, "--precision", "bf16") == 0
    assert "the precision changed (fp32 -> bf16)" in capsys.readouterr().out


def write_format_2_index(out: Path, manifest: Manifest) -> None:
    """A format-2 index root (one whole index per version) holding `manifest`'s records."""
    folder = out / "versions" / "20260101T000000.000000Z-00000000"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(replace(manifest, format_version=2, index_sha256="0" * 64).to_json())
    (folder / "index.faiss").write_bytes(b"not read")
    (out / "CURRENT").write_text(folder.name + "\n")


def test_a_format_2_index_is_refused_and_full_keeps_its_ids(
    collection: Path, tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert build(collection, tmp_path / "v3", tiny_model_dir) == 0
    view = load_artifact(LocalStore(tmp_path / "v3")).manifest
    # Ids as an older build gave them: not the ones a fresh build would give (key order).
    shuffled = tuple(replace(r, id=100 + i) for i, r in enumerate(reversed(view.records)))
    out = tmp_path / "out"
    write_format_2_index(out, replace(view, records=shuffled, next_id=200))
    capsys.readouterr()
    assert build(collection, out, tiny_model_dir) == 1
    error = capsys.readouterr().err
    assert "is format 2" in error and "--full" in error
    assert (out / "CURRENT").read_text().startswith("20260101T")  # nothing published, ids not restarted

    assert build(collection, out, tiny_model_dir, "--full") == 0
    assert "full rebuild of 25 images: --full was given" in capsys.readouterr().out
    rebuilt = load_artifact(LocalStore(out)).manifest
    assert rebuilt.format_version == 3
    assert {r.key: r.id for r in rebuilt.records} == {r.key: r.id for r in shuffled}
    assert rebuilt.next_id == 200


def test_ctrl_c_leaves_the_published_index_and_exits_130(
    collection: Path,
    tmp_path: Path,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import index_builder.local_engine

    out = tmp_path / "out"
    assert build(collection, out, tiny_model_dir) == 0
    version = (out / "CURRENT").read_text()
    change_collection(collection)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(index_builder.local_engine, "embed_local", interrupted)
    capsys.readouterr()
    assert build(collection, out, tiny_model_dir) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    ours = [line for line in captured.err.splitlines() if line.startswith("index_builder")]
    assert ours == ["index_builder: interrupted; the published index is unchanged"]
    assert (out / "CURRENT").read_text() == version
    assert [p.name for p in (out / "versions").iterdir()] == [version.strip()]


def test_sigint_during_a_build_prints_one_line_and_exits_130(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A real Ctrl-C (SIGINT) to `python -m index_builder` while it embeds."""
    import signal
    import subprocess
    import sys

    images, out = tmp_path / "images", tmp_path / "out"
    write_image_folder(images, 300)
    arguments = ["--images", str(images), "--out", str(out), "--model", str(tiny_model_dir), "--batch-size", "4"]
    # `python -m index_builder`, with SIGINT as a terminal's shell hands it over (default handler,
    # unblocked): a child inherits ignored or blocked signals from this pytest process, and in full
    # suite runs the SIGINT was lost (exit 0) while the test alone passed.
    launcher = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
        "sys.argv = ['index_builder', *sys.argv[1:]]; runpy.run_module('index_builder', run_name='__main__')"
    )
    command = [sys.executable, "-c", launcher, *arguments]
    builder = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    assert builder.stderr is not None
    seen = b""
    # Raw reads: tqdm redraws its bar with \r and ends the line only when done. Its first draw
    # ("0/300 ... img/s]") means embedding has started; 300 images at batch 4 take seconds more.
    while b"img/s" not in seen:
        chunk = os.read(builder.stderr.fileno(), 4096)
        assert chunk, seen.decode(errors="replace")
        seen += chunk
    assert b"300/300" not in seen
    builder.send_signal(signal.SIGINT)
    _, rest = builder.communicate(timeout=120)
    stderr = (seen + rest).decode(errors="replace")
    assert builder.returncode == 130, stderr
    assert "Traceback" not in stderr
    ours = [line for line in stderr.splitlines() if line.startswith("index_builder")]
    assert ours == ["index_builder: interrupted; the published index is unchanged"], repr(stderr[-600:])
    assert not (out / "CURRENT").exists()
