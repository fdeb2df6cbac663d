"""The local engine's decoding pool: same artifact as decoding in-process, in order, memory bounded."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from image_search.artifact import load_artifact
from image_search.encoder import ClipImageEncoder
from image_search.preprocessing import PreprocessSpec
from image_search.storage import LocalStore, Store
from index_builder import local_engine
from index_builder.build import discover_images
from index_builder.cli import main
from index_builder.local_engine import default_workers, embed_local, prepared_in_order


def test_default_workers_leave_one_core_to_the_model() -> None:
    assert default_workers(16) == 15
    assert default_workers(2) == 1
    assert default_workers(1) == 1


def test_process_pool_embeds_like_a_single_process(image_folder: Path, tiny_model_dir: Path) -> None:
    store = LocalStore(image_folder)
    keys = [entry.key for entry in discover_images(store)]
    encoder = ClipImageEncoder(str(tiny_model_dir), device="cpu", precision="fp32")
    single = embed_local(store, keys, encoder.spec, encoder.encode_pixels, batch_size=5, workers=0)
    pooled = embed_local(store, keys, encoder.spec, encoder.encode_pixels, batch_size=5, workers=2)
    assert pooled[0] == single[0] and len(single[0]) == 24  # records, in collection order
    assert pooled[2] == single[2] and [key for key, _ in single[2]] == ["notes.jpg"]
    np.testing.assert_allclose(pooled[1], single[1], atol=1e-6)


def test_builds_with_and_without_the_pool_give_the_same_artifact(
    tmp_path: Path, image_folder: Path, tiny_model_dir: Path
) -> None:
    artifacts = []
    for workers in ("0", "2"):
        out = tmp_path / f"workers-{workers}"
        argv = ["--images", str(image_folder), "--out", str(out), "--model", str(tiny_model_dir), "--quiet"]
        assert main([*argv, "--precision", "fp32", "--workers", workers]) == 0
        artifacts.append(load_artifact(LocalStore(out)))
    single, pooled = artifacts
    assert pooled.manifest.records == single.manifest.records
    assert pooled.manifest.skipped == single.manifest.skipped
    vectors = [artifact.index.reconstruct_n(0, artifact.index.ntotal) for artifact in artifacts]
    np.testing.assert_allclose(vectors[1], vectors[0], atol=1e-6)


def test_builder_says_which_precision_runs(
    tmp_path: Path, image_folder: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--images", str(image_folder), "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir)]
    assert main([*argv, "--quiet", "--precision", "fp32", "--workers", "1"]) == 0
    assert "encoding on cpu in fp32, 1 decoding processes" in capsys.readouterr().out


class CountingStore(LocalStore):
    """Counts reads (from any thread) to observe how far decoding runs ahead of the consumer."""

    def __init__(self, location: Path) -> None:
        super().__init__(location)
        self.reads = 0
        self.lock = threading.Lock()

    def read_bytes(self, key: str) -> bytes:
        with self.lock:
            self.reads += 1
        return super().read_bytes(key)


def test_decoding_runs_at_most_a_window_ahead_and_yields_in_order(
    image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CountingStore(image_folder)
    keys = [entry.key for entry in discover_images(store)]

    def thread_pool(store_: Store, workers: int) -> Executor:
        # Threads instead of processes, so the reads are counted in this process.
        return ThreadPoolExecutor(workers, initializer=local_engine._open_worker_store, initargs=(store_.uri,))

    monkeypatch.setattr(local_engine, "open_store", lambda uri: store)
    monkeypatch.setattr(local_engine, "_process_pool", thread_pool)
    window = 6
    seen = []
    for consumed, item in enumerate(
        prepared_in_order(store, keys, PreprocessSpec(), workers=3, window=window), start=1
    ):
        seen.append(item.key)
        assert store.reads <= consumed + window
    assert seen == keys


def test_workers_see_this_builds_environment_not_the_fork_servers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fork server keeps the environment it started with; S3 settings (AWS_*) set later must still
    # reach the workers that open the store.
    local_engine.start_workers_early()
    monkeypatch.setenv("IMAGE_SEARCH_TEST_MARK", "set after the fork server started")
    with local_engine._process_pool(LocalStore(tmp_path), 1) as pool:
        seen = pool.submit(os.getenv, "IMAGE_SEARCH_TEST_MARK").result(timeout=120)
    assert seen == "set after the fork server started"


def test_a_killed_builder_leaves_no_decoding_process_behind(tmp_path: Path, tiny_model_dir: Path) -> None:
    import re
    import signal
    import subprocess
    import sys
    import time

    from benchmarks.proc_cpu import sample
    from tests.support import write_image_folder

    images = tmp_path / "images"
    write_image_folder(images, 120)
    command = [sys.executable, "-m", "index_builder", "--images", str(images), "--out", str(tmp_path / "out")]
    builder = subprocess.Popen(
        [*command, "--model", str(tiny_model_dir), "--batch-size", "4", "--workers", "2"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert builder.stderr is not None
    # Wait (bounded by the builder's own run) until its progress bar shows embedded images: the
    # pool's workers are up and decoding.
    text = ""
    while not re.search(r"\b([1-9]\d*)/120 ", text):
        char = builder.stderr.read(1)
        assert char, "the builder ended before embedding anything"
        text = "" if char in "\r\n" else text + char
    helpers = set(sample(builder.pid).ticks) - {builder.pid}
    assert helpers, "the builder started no decoding processes"
    builder.send_signal(signal.SIGKILL)
    builder.wait(timeout=60)
    deadline = time.monotonic() + 30  # the workers' watchdog checks every WATCHDOG_PERIOD_S
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in helpers):
        time.sleep(0.2)
    alive = [pid for pid in helpers if Path(f"/proc/{pid}").exists()]
    for pid in alive:  # do not leak them into the rest of the session if the assertion fails
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"decoding processes outlived the killed builder: {alive}"
