"""A real builder SIGKILLed at each point of a segment publish or a compaction leaves a serveable index.

The builder stops itself (SIGSTOP) at a named point when INDEX_BUILDER_STOP_AT says so
(index_builder.build.checkpoint); the test then SIGKILLs it there, so the kill lands exactly between
two steps of the publish, not wherever a timer happens to fire.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from image_search.artifact import load_artifact
from image_search.storage import LocalStore
from index_builder.build import STOP_AT_ENV
from index_builder.cli import main
from tests.support import write_image_folder

# (point, extra flags, whether CURRENT has moved to the new version when the builder dies there)
POINTS = [
    ("segment-written", [], False),  # the new segment is uploaded, no version names it
    ("version-written", [], False),  # version.json written and read back, CURRENT not yet
    ("published", [], True),  # CURRENT written: the new version is what is served
    ("compaction-started", ["--compact"], True),  # the change is published; the merge has begun
    ("compaction-segment-written", ["--compact"], True),  # merged segment uploaded, its version not
    ("compaction-version-written", ["--compact"], True),  # compacted version.json written, CURRENT not
]


@pytest.mark.parametrize(("point", "extra", "moved"), POINTS, ids=[p[0] for p in POINTS])
def test_a_builder_killed_mid_publish_leaves_a_serveable_version(
    tmp_path: Path, image_folder: Path, tiny_model_dir: Path, point: str, extra: list[str], moved: bool
) -> None:
    images, out = tmp_path / "images", tmp_path / "out"
    shutil.copytree(image_folder, images)
    args = ["--images", str(images), "--out", str(out), "--model", str(tiny_model_dir), "--quiet"]
    assert main(args) == 0
    before = (out / "CURRENT").read_text()
    write_image_folder(images / "more", 3, start_seed=800)

    env = {**os.environ, STOP_AT_ENV: point}
    command = [sys.executable, "-m", "index_builder", *args, *extra]
    builder = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    assert builder.stderr is not None
    seen = ""
    for line in builder.stderr:  # ends when the builder exits: a missed point fails below, never hangs
        seen += line
        if f"stopped at {point}" in line:
            break
    assert f"stopped at {point}" in seen, seen[-2000:]
    builder.send_signal(signal.SIGKILL)
    builder.wait(timeout=60)
    assert builder.returncode == -signal.SIGKILL

    # What CURRENT names is whole: every file of every segment it lists reads back with its checksum.
    served = load_artifact(LocalStore(out), cache_dir=tmp_path / "cache")
    if moved:
        assert (out / "CURRENT").read_text() != before
        assert served.manifest.count == 27
    else:
        assert (out / "CURRENT").read_text() == before
        assert served.manifest.count == 24
    ids_served = {r.key: r.id for r in served.manifest.records}

    # The next build finishes the job; ids given before the crash keep their meaning.
    assert main([*args, *extra]) == 0
    final = load_artifact(LocalStore(out)).manifest
    assert final.count == 27
    assert {key: ids_served[key] for key in ids_served} == {r.key: r.id for r in final.records if r.key in ids_served}
