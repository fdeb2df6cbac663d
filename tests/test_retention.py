"""Retention of published versions: the rule as a table, and deletion failures that never fail a build."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from image_search.artifact import (
    POINTER,
    RetentionPolicy,
    VersionInfo,
    list_versions,
    new_version_name,
    prune_versions,
    publish,
    read_current,
    version_time,
    versions_to_delete,
)
from image_search.faiss_index import build_faiss_index, write_index_file
from image_search.index_spec import IndexSpec
from image_search.manifest import ImageRecord, Manifest
from image_search.storage import LocalStore
from tests.support import sample_manifest
from tests.test_s3 import FailingStore

HOUR = 3600.0
DAY = 24 * HOUR


def versions(*published_hours_ago: float, now: float = 1_000_000.0) -> list[VersionInfo]:
    """Versions named v0, v1, ... published the given hours before `now` (oldest first)."""
    return [VersionInfo(f"v{i}", now - hours * HOUR) for i, hours in enumerate(published_hours_ago)]


@pytest.mark.parametrize(
    ("ages_h", "current", "policy", "deleted"),
    [
        # v0..v5 a week apart: only CURRENT (v5), the one before it and the 3 newest are kept.
        ((600, 500, 400, 300, 200, 100), "v5", RetentionPolicy(), ["v0", "v1", "v2"]),
        # Retired less than 24 h ago (its successor published 10 h ago): kept, though older than 3 newest.
        ((600, 500, 400, 10, 5, 1), "v5", RetentionPolicy(), ["v0", "v1"]),
        # Five rebuilds within an hour: everything retired < 24 h ago stays.
        ((1.0, 0.8, 0.6, 0.4, 0.2, 0.0), "v5", RetentionPolicy(), []),
        # Retention 0 and keep 2: CURRENT and the one before only.
        ((5, 4, 3, 2, 1, 0), "v5", RetentionPolicy(retention_s=0, keep_versions=2), ["v0", "v1", "v2", "v3"]),
        # CURRENT rolled back to an old version: it and its predecessor are kept anyway.
        ((600, 500, 400, 300, 200, 100), "v1", RetentionPolicy(keep_versions=2), ["v2", "v3"]),
        # Nothing to delete when there are few versions.
        ((600,), "v0", RetentionPolicy(), []),
    ],
)
def test_versions_to_delete(
    ages_h: tuple[float, ...], current: str, policy: RetentionPolicy, deleted: list[str]
) -> None:
    now = 1_000_000.0
    assert versions_to_delete(versions(*ages_h, now=now), current, now, policy) == deleted


def test_a_version_whose_name_has_no_time_is_never_deleted() -> None:
    infos = [VersionInfo("manual-copy", None), *versions(600, 500, 400, 300)]
    assert versions_to_delete(infos, "v3", 1_000_000.0, RetentionPolicy(keep_versions=2)) == ["v0", "v1"]


def test_version_names_carry_their_publish_time() -> None:
    assert version_time(new_version_name(now=1_700_000_000.0)) == 1_700_000_000.0
    assert version_time("20231114T221320Z-0123abcd") == 1_700_000_000.0  # names before microseconds
    assert version_time("not-a-version") is None


def test_two_builds_in_one_second_are_ordered_by_their_publish_time() -> None:
    earlier, later = new_version_name(now=1_700_000_000.25), new_version_name(now=1_700_000_000.75)
    assert version_time(later) - version_time(earlier) == pytest.approx(0.5)  # type: ignore[operator]
    assert sorted([later, earlier]) == [earlier, later]  # whatever their random suffixes


def test_policy_refuses_settings_that_could_delete_current_or_its_predecessor() -> None:
    with pytest.raises(ValueError, match="keep_versions"):
        RetentionPolicy(keep_versions=1)
    with pytest.raises(ValueError, match="retention_s"):
        RetentionPolicy(retention_s=-1)


def tiny_artifact(tmp_path: Path) -> tuple[Path, Manifest]:
    from image_search.artifact import file_sha256

    index_file = tmp_path / "index.faiss"
    write_index_file(build_faiss_index(np.eye(4, dtype=np.float32), IndexSpec("Flat")), index_file)
    records = tuple(ImageRecord(i, f"{i}.jpg", 1, "h") for i in range(4))
    manifest = sample_manifest(records, index_sha256=file_sha256(index_file))
    return index_file, manifest


def test_publish_prunes_by_the_rule(tmp_path: Path) -> None:
    index_file, manifest = tiny_artifact(tmp_path)
    store = LocalStore(tmp_path / "out")
    policy = RetentionPolicy(retention_s=DAY, keep_versions=2)
    start = 1_700_000_000.0
    # Seven builds 10 days apart: each retired long before the next but one.
    names = [publish(store, index_file, manifest, policy, now=start + i * 10 * DAY) for i in range(7)]
    assert [v.name for v in list_versions(store)] == names[-2:]
    assert read_current(store) == names[-1]


def test_a_failing_delete_is_a_warning_and_the_build_is_published(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    index_file, manifest = tiny_artifact(tmp_path)
    inner = LocalStore(tmp_path / "out")
    policy = RetentionPolicy(retention_s=0, keep_versions=2)
    old = [publish(inner, index_file, manifest, policy, now=1_700_000_000.0 + i) for i in range(2)]
    failing = FailingStore(inner, fail_deletes=True)
    with caplog.at_level(logging.WARNING, logger="image_search.artifact"):
        newest = publish(failing, index_file, manifest, policy, now=1_700_000_010.0)
    assert failing.delete_attempts == [f"versions/{old[0]}"]
    assert inner.read_bytes(POINTER).decode().strip() == newest
    assert f"could not delete old index version {old[0]}" in caplog.text
    assert prune_versions(inner, newest, policy, now=1_700_000_020.0) == [old[0]]
