"""Retention of published versions: the rule as a table, and deletion failures that never fail a build."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from image_search.artifact import (
    POINTER,
    RetentionPolicy,
    VersionFactsCache,
    VersionInfo,
    list_versions,
    new_version_name,
    prune,
    prune_versions,
    publish,
    read_current,
    version_time,
    versions_to_delete,
)
from image_search.manifest import ImageRecord
from image_search.segments import (
    SEGMENTS,
    SegmentInfo,
    Version,
    build_segment,
    new_segment_name,
    read_version,
    with_changes,
)
from image_search.storage import LocalStore
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


def test_the_version_current_replaced_is_kept_even_behind_a_crashed_builds_version() -> None:
    """v4 is a version file a killed build wrote and CURRENT never named: v3 is what v5 replaced."""
    now = 1_000_000.0
    infos = versions(600, 500, 400, 300, 200, 100, now=now)
    policy = RetentionPolicy(retention_s=0, keep_versions=2)
    assert versions_to_delete(infos, "v5", now, policy) == ["v0", "v1", "v2", "v3"]
    assert versions_to_delete(infos, "v5", now, policy, parent_of_current="v3") == ["v0", "v1", "v2"]


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


def publish_versions(store: LocalStore, count: int, start: float, step_s: float, policy: RetentionPolicy,
                     store_for_last: object | None = None) -> tuple[list[str], list[str], str]:  # fmt: skip
    """`count` versions `step_s` apart, each sharing the first segment and replacing the one before:
    v_i = [base, s_i]. Returns (version names, segment names s_i, the base segment's name)."""
    base = one_segment(store, 0, start)
    version = Version("", "m", "f", 4, {}, "fp32", "/c", (base,), {}, 4)
    names, segments = [], []
    for i in range(count):
        now = start + i * step_s
        segment = one_segment(store, i + 1, now)
        drop = [segments[-1]] if segments else []
        version = with_changes(version, name=new_version_name(now), add=[segment], drop=drop)
        version = replace(version, parent=names[-1] if names else None)
        target = store_for_last if (store_for_last is not None and i == count - 1) else store
        names.append(publish(target, version, policy, now=now))  # type: ignore[arg-type]
        segments.append(segment.name)
    return names, segments, base.name


def one_segment(store: LocalStore, seed: int, now: float) -> SegmentInfo:
    vectors = np.eye(4, dtype=np.float32)
    records = [ImageRecord(i, f"{seed}/{i}.jpg", 1, "h") for i in range(4)]
    return build_segment(store, np.arange(4), vectors, records, 4, name=new_segment_name(now))


def segment_folders(root: Path) -> set[str]:
    return {p.name for p in (root / SEGMENTS).iterdir()}


def test_publish_prunes_by_the_rule_and_keeps_every_segment_a_kept_version_names(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "out")
    policy = RetentionPolicy(retention_s=DAY, keep_versions=2, segment_grace_s=HOUR)
    # Seven builds 10 days apart: each retired long before the next but one.
    names, segments, base = publish_versions(store, 7, 1_700_000_000.0, 10 * DAY, policy)
    assert [v.name for v in list_versions(store)] == names[-2:]
    assert read_current(store) == names[-1]
    # The kept versions name base, s5 and s6: exactly those remain; s1..s4 are gone.
    assert segment_folders(tmp_path / "out") == {base, segments[-2], segments[-1]}
    for name in names[-2:]:
        for segment in read_version(store, name).segments:
            assert (tmp_path / "out" / SEGMENTS / segment.name / "index.faiss").is_file()


def test_an_unreferenced_segment_younger_than_the_grace_is_kept(tmp_path: Path) -> None:
    """A build in progress has written its segment but not its version yet: pruning must not take it."""
    store = LocalStore(tmp_path / "out")
    policy = RetentionPolicy(retention_s=0, keep_versions=2, segment_grace_s=HOUR)
    start = 1_700_000_000.0
    in_progress = one_segment(store, 99, start + 3 * DAY - 60)  # written a minute before the last publish
    abandoned = one_segment(store, 98, start)  # a crashed build's segment, three days old
    _names, _segments, _base = publish_versions(store, 3, start + DAY, DAY, policy)
    assert in_progress.name in segment_folders(tmp_path / "out")
    assert abandoned.name not in segment_folders(tmp_path / "out")


def test_an_unreadable_kept_version_stops_segment_deletion(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = LocalStore(tmp_path / "out")
    policy = RetentionPolicy(retention_s=0, keep_versions=2, segment_grace_s=0)
    names, _segments, _base = publish_versions(store, 2, 1_700_000_000.0, DAY, policy)
    (tmp_path / "out" / "versions" / names[0] / "version.json").write_text("{")
    orphan = one_segment(store, 50, 1_600_000_000.0)
    with caplog.at_level(logging.WARNING, logger="image_search.artifact"):
        prune(store, names[-1], policy, now=1_800_000_000.0)
    assert orphan.name in segment_folders(tmp_path / "out")
    assert "no segment is deleted" in caplog.text


def test_the_newest_version_of_each_model_is_kept(tmp_path: Path) -> None:
    """Item 8: a service that refused newer publishes of another model still finds its own after a restart."""
    now = 1_000_000.0
    infos = versions(600, 500, 400, 300, 200, 100, now=now)
    identities = {"v0": "A", "v1": "A", "v2": "B", "v3": "B", "v4": "B", "v5": "B"}
    policy = RetentionPolicy(keep_versions=2)
    assert versions_to_delete(infos, "v5", now, policy) == ["v0", "v1", "v2", "v3"]
    assert versions_to_delete(infos, "v5", now, policy, identities) == ["v0", "v2", "v3"]


def test_a_failing_delete_is_a_warning_and_the_build_is_published(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inner = LocalStore(tmp_path / "out")
    policy = RetentionPolicy(retention_s=0, keep_versions=2, segment_grace_s=0)
    failing = FailingStore(inner, fail_deletes=True)
    with caplog.at_level(logging.WARNING, logger="image_search.artifact"):
        names, segments, _ = publish_versions(inner, 3, 1_700_000_000.0, 1.0, policy, store_for_last=failing)
    assert failing.delete_attempts[0] == f"versions/{names[0]}"
    assert inner.read_bytes(POINTER).decode().strip() == names[-1]
    assert f"could not delete old index version {names[0]}" in caplog.text
    assert prune_versions(inner, names[-1], policy, now=1_700_000_020.0) == [names[0]]
    assert segments[0] not in segment_folders(tmp_path / "out")  # its only version is gone now


class CountingStore(LocalStore):
    """A real local store that counts reads of version files."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.version_reads: list[str] = []

    def read_bytes(self, key: str) -> bytes:
        if key.endswith("/version.json"):
            self.version_reads.append(key)
        return super().read_bytes(key)


def test_a_kept_facts_cache_reads_each_version_file_once_across_prunes(tmp_path: Path) -> None:
    """The Writer prunes every few seconds: with its cache, a prune reads only version files it has not seen
    (CURRENT's own, for its parent, excepted), and deletes by the same rule as without it."""
    store = CountingStore(tmp_path / "out")
    keep_all = RetentionPolicy(retention_s=10 * DAY, keep_versions=100, segment_grace_s=0)
    names, _segments, _base = publish_versions(store, 6, 1_700_000_000.0, HOUR, keep_all)
    facts = VersionFactsCache()
    prune(store, names[-1], keep_all, now=1_700_100_000.0, facts=facts)
    store.version_reads.clear()
    prune(store, names[-1], keep_all, now=1_700_100_000.0, facts=facts)
    assert store.version_reads == [f"versions/{names[-1]}/version.json"]  # the parent of CURRENT only
    strict = RetentionPolicy(retention_s=0, keep_versions=2, segment_grace_s=0)
    uncached = CountingStore(tmp_path / "out")
    assert prune(store, names[-1], strict, now=1_700_100_000.0, facts=facts)[0] == names[:4]
    assert prune(uncached, names[-1], strict, now=1_700_100_000.0) == ([], [])  # nothing left to delete
    assert set(list_versions(store)) == set(list_versions(uncached))
    assert {info.name for info in list_versions(store)} == set(names[4:])
