"""The memory budget flows from the builder's --max-index-memory (and serve_config's max_index_memory)
into the planner, and /info's recall report reads what tuning measured (serve_app/recall_info.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydantic import ValidationError

from image_search.index_planner import GiB, flat_bytes, parse_byte_size
from image_search.segments import read_current_version
from image_search.storage import LocalStore
from index_builder.cli import parse_args
from serve_app.config import AppArgs
from serve_app.recall_info import recall_report
from tests.builds_without_a_model import DIM, fake_build
from tests.test_segment_holdings import NO_MERGES

COUNT = 3000  # enough for an IVF index with lists to probe


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024", 1024),
        (4096, 4096),
        ("512MiB", 512 * 2**20),
        ("4GiB", 4 * GiB),
        ("1.5 GiB", int(1.5 * GiB)),
        ("16GB", 16 * 10**9),
        ("2tib", 2 * 2**40),
    ],
)
def test_sizes_parse_with_and_without_units(text: str | int, expected: int) -> None:
    assert parse_byte_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "4 GiBs", "-5", "0", "", "1e9"])
def test_a_size_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_byte_size(text)


def test_the_builder_flag_and_the_serve_config_key_take_sizes() -> None:
    args = parse_args(["--images", "a", "--out", "b", "--max-index-memory", "512MiB"])
    assert args.max_index_memory == 512 * 2**20
    assert parse_args(["--images", "a", "--out", "b"]).max_index_memory == 4 * GiB
    with pytest.raises(SystemExit):
        parse_args(["--images", "a", "--out", "b", "--max-index-memory", "lots"])
    assert AppArgs.model_validate({"max_index_memory": "16GiB"}).max_index_memory == 16 * GiB
    assert AppArgs().max_index_memory == 4 * GiB
    with pytest.raises(ValidationError, match="not a size"):
        AppArgs.model_validate({"max_index_memory": "big"})


def write(folder: Path, count: int) -> None:
    folder.mkdir()
    for i in range(count):
        (folder / f"{i:05d}.jpg").write_bytes(f"image {i}".encode() * 3)


def test_a_budget_below_flat_gives_a_tuned_compressed_segment_and_info_reports_its_recall(tmp_path: Path) -> None:
    images, root = tmp_path / "images", tmp_path / "index"
    write(images, COUNT)
    budget = int(flat_bytes(COUNT, DIM, 52) * 0.9)  # Flat (with IndexIDMap2's 52 B a vector) does not fit
    fake_build(images, root, merge_policy=NO_MERGES, max_index_memory=budget)
    version = read_current_version(LocalStore(root))
    assert version is not None
    (segment,) = version.segments
    assert segment.index["factory"] != "Flat" and "SQ8" in segment.index["factory"]

    report = recall_report(version)
    (entry,) = report["segments"]
    assert entry["exact"] is False and entry["param"] == "nprobe" and entry["value"] >= 1
    assert entry["target"] == report["target"] == 0.95
    assert report["min_recall"] == entry["recall"] and 0 < entry["recall"] <= 1
    assert report["met"] is entry["met"] is True and entry["recall_lower_bound"] >= 0.95
    assert entry["p50_ms"] > 0 and report["overridden"] is None

    # A searcher.nprobe setting replaces the tuned knob: the report no longer claims the target.
    forced = recall_report(version, nprobe=1)
    assert forced["overridden"] == {"nprobe": 1} and forced["met"] is False


def test_the_default_budget_keeps_small_segments_exact(tmp_path: Path) -> None:
    images, root = tmp_path / "images", tmp_path / "index"
    write(images, 50)
    fake_build(images, root, merge_policy=NO_MERGES)
    version = read_current_version(LocalStore(root))
    assert version is not None
    report = recall_report(version, nprobe=8)  # no approximate segment: nothing overridden to speak of
    assert report["segments"][0]["index"] == "Flat" and report["segments"][0]["exact"] is True
    assert report["min_recall"] == 1.0 and report["met"] is True


def test_a_budget_nothing_fits_fails_the_build_naming_the_flag(tmp_path: Path) -> None:
    images, root = tmp_path / "images", tmp_path / "index"
    write(images, 300)
    with pytest.raises(ValueError, match="--max-index-memory"):
        fake_build(images, root, merge_policy=NO_MERGES, max_index_memory=1000)
    assert read_current_version(LocalStore(root)) is None  # nothing published


def test_an_untuned_approximate_segment_reports_no_recall(tmp_path: Path) -> None:
    images, root = tmp_path / "images", tmp_path / "index"
    write(images, 20)
    fake_build(images, root, merge_policy=NO_MERGES)
    version = read_current_version(LocalStore(root))
    assert version is not None
    old = dataclasses.replace(version.segments[0], index={"factory": "IVF4,Flat", "params": {"nprobe": 2}})
    report = recall_report(dataclasses.replace(version, segments=(old,)))
    assert report["segments"][0]["recall"] is None and report["min_recall"] is None and report["met"] is False
