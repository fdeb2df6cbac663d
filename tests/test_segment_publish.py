"""Publishing changes as segments: exact answers, cost that follows the change, failures that keep ids."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from image_search.artifact import load_artifact
from image_search.merge_policy import MergePolicy
from image_search.segment_search import search_segments, searchable
from image_search.segments import (
    SEGMENTS,
    Version,
    open_segment_index,
    open_segment_vectors,
    read_current_version,
    read_segment_records,
    version_file,
)
from image_search.storage import LocalStore
from index_builder.build import BuildError
from tests.builds_without_a_model import RecordingStore, fake_build, vector_of

NO_MERGES = MergePolicy(segments_per_tier=50, max_merge_at_once=50, max_deleted_fraction=1.0)  # keeps every segment


def write_files(folder: Path, names: list[str], salt: str = "") -> None:
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"{name}{salt}".encode() * 3)


def search_version(store: LocalStore, version: Version, queries: np.ndarray, k: int, cache: Path):  # type: ignore[no-untyped-def]
    segments = [
        searchable(s.name, open_segment_index(store, s, cache), version.deleted_ids(s.name)) for s in version.segments
    ]
    return search_segments(segments, queries, k)


def brute_force(live: dict[int, np.ndarray], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = sorted(live)
    scores = queries @ np.stack([live[i] for i in ids]).T if ids else np.zeros((len(queries), 0))
    out_ids = np.full((len(queries), k), -1, dtype=np.int64)
    out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for row in range(len(queries)):
        order = sorted(range(len(ids)), key=lambda j: (-scores[row, j], ids[j]))[:k]
        out_ids[row, : len(order)] = [ids[j] for j in order]
        out_scores[row, : len(order)] = scores[row, order]
    return out_scores, out_ids


def expected_live(images: Path, store: LocalStore) -> dict[int, np.ndarray]:
    """id -> the vector the file under that id's key has now (what one exact index over it would hold)."""
    view = load_artifact(store).manifest
    return {r.id: vector_of((images / r.key).read_bytes()) for r in view.records}


OPS = st.lists(
    st.tuples(st.sampled_from(["add", "edit", "remove", "move"]), st.integers(1, 4), st.integers(0, 10**6)),
    min_size=1,
    max_size=6,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_builds_of_random_changes_search_like_brute_force(tmp_path_factory, ops) -> None:  # type: ignore[no-untyped-def]
    """After each publish: segment search == brute force over the live vectors; ids keep their keys."""
    images, root = tmp_path_factory.mktemp("images"), tmp_path_factory.mktemp("index")
    store, cache = LocalStore(root), Path(tmp_path_factory.mktemp("cache"))
    write_files(images, [f"start{i}.jpg" for i in range(5)])
    fake_build(images, root, merge_policy=NO_MERGES)
    id_of = {r.key: r.id for r in load_artifact(store).manifest.records}
    queries = np.stack([vector_of(bytes([i])) for i in range(4)])
    for step, (op, amount, seed) in enumerate(ops):
        rng = np.random.default_rng(seed)
        present = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.jpg"))
        chosen = [present[i] for i in rng.choice(len(present), min(amount, len(present)), replace=False)]
        if op == "add" or not present:
            write_files(images, [f"s{step}/n{i}.jpg" for i in range(amount)])
        elif op == "edit":
            write_files(images, chosen, salt=f"edit{step}")
        elif op == "remove":
            for key in chosen:
                (images / key).unlink()
        else:  # moved within the collection: same bytes under another key
            for key in chosen:
                target = images / f"moved{step}" / Path(key).name
                target.parent.mkdir(parents=True, exist_ok=True)
                (images / key).rename(target)
        fake_build(images, root, merge_policy=NO_MERGES)
        version = read_current_version(store)
        assert version is not None
        view = load_artifact(store).manifest
        # Stable ids: a key that stayed keeps its id; no id names two keys over time.
        for record in view.records:
            if record.key in id_of:
                assert id_of[record.key] == record.id
            id_of.setdefault(record.key, record.id)
        live = expected_live(images, store)
        assert version.live_count == len(live)
        k = 6
        scores, ids = search_version(store, version, queries, k, cache)
        want_scores, want_ids = brute_force(live, queries, k)
        assert ids.tolist() == want_ids.tolist()
        finite = want_ids >= 0
        np.testing.assert_allclose(scores[finite], want_scores[finite], atol=1e-5)


def test_compaction_keeps_answers_and_ids_and_drops_dead_vectors(tmp_path: Path) -> None:
    images, root = tmp_path / "images", tmp_path / "index"
    store = LocalStore(root)
    write_files(images, [f"a{i}.jpg" for i in range(30)])
    fake_build(images, root, merge_policy=NO_MERGES)
    write_files(images, [f"b{i}.jpg" for i in range(10)])
    fake_build(images, root, merge_policy=NO_MERGES)
    write_files(images, [f"a{i}.jpg" for i in range(5)], salt="edited")  # new vectors, same ids
    for i in range(10, 20):
        (images / f"a{i}.jpg").unlink()
    fake_build(images, root, merge_policy=NO_MERGES)
    before = read_current_version(store)
    assert before is not None and len(before.segments) == 3 and before.deleted
    queries = np.stack([vector_of(bytes([i])) for i in range(8)])
    scores_before, ids_before = search_version(store, before, queries, 10, tmp_path / "cache")
    records_before = {r.key: r.id for r in load_artifact(store).manifest.records}

    report = fake_build(images, root, compact=True, merge_policy=NO_MERGES)
    after = read_current_version(store)
    assert after is not None and report.compacted == after.name and after.parent == before.name
    assert len(after.segments) == 1 and after.deleted == {} and after.overrides == ()
    (segment,) = after.segments
    assert segment.count == before.live_count == 30  # dead vectors are gone from the merged segment
    assert len(open_segment_vectors(store, segment, tmp_path / "cache")) == 30
    assert {r.key: r.id for r in read_segment_records(store, segment)} == records_before
    scores_after, ids_after = search_version(store, after, queries, 10, tmp_path / "cache")
    assert ids_after.tolist() == ids_before.tolist()
    np.testing.assert_allclose(scores_after, scores_before, atol=1e-6)
    assert after.next_id == before.next_id


def test_the_builder_compacts_when_the_policy_says_so(tmp_path: Path) -> None:
    images, root = tmp_path / "images", tmp_path / "index"
    policy = MergePolicy(segments_per_tier=3, max_merge_at_once=3, floor_segment_size=100)
    reports = []
    for step in range(3):
        write_files(images, [f"s{step}/{i}.jpg" for i in range(4)])
        reports.append(fake_build(images, root, merge_policy=policy))
    assert [r.compacted is not None for r in reports] == [False, False, True]
    version = read_current_version(LocalStore(root))
    assert version is not None and len(version.segments) == 1 and version.live_count == 12


def test_an_incremental_publish_writes_what_changed_and_reads_no_vectors(tmp_path: Path) -> None:
    images, root = tmp_path / "images", tmp_path / "index"
    write_files(images, [f"img{i:04d}.jpg" for i in range(2000)])
    first = RecordingStore(LocalStore(root))
    fake_build(images, root, out_store=first)
    old_segments = {s.name for s in read_current_version(LocalStore(root)).segments}  # type: ignore[union-attr]
    write_files(images, ["new.jpg"])
    write_files(images, ["img0001.jpg"], salt="edited")
    (images / "img0002.jpg").unlink()
    second = RecordingStore(LocalStore(root))
    report = fake_build(images, root, out_store=second, merge_policy=NO_MERGES)
    assert (report.added, report.changed, report.removed) == (1, 1, 1)
    # One small segment, a version file and CURRENT: well under 5% of the first publish.
    assert second.written_bytes < 0.05 * first.written_bytes, (second.written_bytes, first.written_bytes)
    # Of the published segments it read the records only: no vectors, no index.
    old_reads = [key for key in second.reads if key.startswith(SEGMENTS) and key.split("/")[1] in old_segments]
    assert old_reads and all(key.endswith("records.json") for key in old_reads), old_reads


def test_a_touched_file_is_recorded_as_an_override_without_a_new_segment(tmp_path: Path) -> None:
    """Same bytes, new mtime: the new stat data is published as a record override; no vector is written."""
    images, root = tmp_path / "images", tmp_path / "index"
    store = LocalStore(root)
    write_files(images, ["a.jpg", "b.jpg"])
    fake_build(images, root)
    before = read_current_version(store)
    stat = (images / "a.jpg").stat()
    os.utime(images / "a.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    report = fake_build(images, root)
    after = read_current_version(store)
    assert before is not None and after is not None and report.version == after.name
    assert after.segments == before.segments and after.deleted == {}
    assert [(r.id, r.key, r.mtime_ns) for r in after.overrides] == [(0, "a.jpg", stat.st_mtime_ns + 5_000_000_000)]
    assert {r.key: r.mtime_ns for r in load_artifact(store).manifest.records}[
        "a.jpg"
    ] == stat.st_mtime_ns + 5_000_000_000
    assert fake_build(images, root).version is None  # recorded: the next build has nothing to do
    # Compaction folds the override into the merged segment's records.
    fake_build(images, root, compact=True)
    compacted = read_current_version(store)
    assert compacted is not None and compacted.overrides == ()
    assert {r.key: r.mtime_ns for r in load_artifact(store).manifest.records}[
        "a.jpg"
    ] == stat.st_mtime_ns + 5_000_000_000


def test_a_moved_file_is_served_under_its_new_key(tmp_path: Path) -> None:
    images, root = tmp_path / "images", tmp_path / "index"
    write_files(images, ["a.jpg", "b.jpg"])
    fake_build(images, root)
    (images / "sub").mkdir()
    (images / "a.jpg").rename(images / "sub" / "a.jpg")
    fake_build(images, root)
    assert sorted(r.key for r in load_artifact(LocalStore(root)).manifest.records) == ["b.jpg", "sub/a.jpg"]


# --- issue 21 item 2: an unreadable published version fails the build ----------------------------------


def test_a_failing_read_of_the_published_version_fails_the_build(tmp_path: Path) -> None:
    images, root = tmp_path / "images", tmp_path / "index"
    write_files(images, ["a.jpg", "b.jpg"])
    fake_build(images, root)
    current = (root / "CURRENT").read_text()
    write_files(images, ["c.jpg"])
    flaky = RecordingStore(LocalStore(root), fail_reads=lambda key: key.endswith("version.json"))
    with pytest.raises(BuildError, match=r"cannot be read.*503 SlowDown.*ids keep their meaning"):
        fake_build(images, root, out_store=flaky)
    assert (root / "CURRENT").read_text() == current
    flaky_records = RecordingStore(LocalStore(root), fail_reads=lambda key: key.endswith("records.json"))
    with pytest.raises(BuildError, match="503 SlowDown"):
        fake_build(images, root, out_store=flaky_records)
    report = fake_build(images, root)  # the store answers again: c.jpg gets the next id, not 0
    assert report.added == 1
    assert {r.key: r.id for r in load_artifact(LocalStore(root)).manifest.records} == {
        "a.jpg": 0,
        "b.jpg": 1,
        "c.jpg": 2,
    }


def test_a_version_from_a_newer_builder_fails_the_build(tmp_path: Path) -> None:
    images, root = tmp_path / "images", tmp_path / "index"
    write_files(images, ["a.jpg"])
    fake_build(images, root)
    name = (root / "CURRENT").read_text().strip()
    path = root / version_file(name)
    data = json.loads(path.read_text())
    data["format_version"] = 4
    path.write_text(json.dumps(data))
    with pytest.raises(BuildError, match="format_version 4 is not supported"):
        fake_build(images, root)
    assert (root / "CURRENT").read_text().strip() == name


def test_ids_start_at_zero_only_when_nothing_was_published(tmp_path: Path) -> None:
    images, root = tmp_path / "images", tmp_path / "index"
    write_files(images, ["a.jpg"])
    (root / SEGMENTS / "seg-leftover").mkdir(parents=True)  # a crashed first build left a segment
    fake_build(images, root)
    assert [r.id for r in load_artifact(LocalStore(root)).manifest.records] == [0]


# --- issue 21 item 10: a moved collection root and an empty collection are changes ------------------------


def test_a_moved_collection_root_publishes_a_version_with_the_new_source(tmp_path: Path) -> None:
    images, root = tmp_path / "images", tmp_path / "index"
    write_files(images, ["a.jpg", "b.jpg"])
    fake_build(images, root)
    before = read_current_version(LocalStore(root))
    moved = tmp_path / "renamed-images"
    shutil.move(images, moved)
    report = fake_build(moved, root)
    assert report.version is not None and report.version != before.name  # type: ignore[union-attr]
    after = read_current_version(LocalStore(root))
    assert after is not None and after.source == str(moved.resolve())
    assert (report.added, report.changed, report.removed, report.reused) == (0, 0, 0, 2)
    assert after.segments == before.segments  # type: ignore[union-attr]  # nothing re-embedded
    assert fake_build(moved, root).version is None  # and now nothing changed


def test_an_empty_collection_publishes_an_empty_version(tmp_path: Path) -> None:
    images, root = tmp_path / "images", tmp_path / "index"
    write_files(images, ["a.jpg", "b.jpg"])
    fake_build(images, root)
    for path in images.iterdir():
        path.unlink()
    report = fake_build(images, root)
    assert report.version is not None and report.removed == 2
    version = read_current_version(LocalStore(root))
    assert version is not None and version.live_count == 0 and version.next_id == 2
    assert load_artifact(LocalStore(root)).manifest.records == ()
    write_files(images, ["c.jpg"])
    fake_build(images, root)
    assert [r.id for r in load_artifact(LocalStore(root)).manifest.records] == [2]  # ids never reused


def test_an_empty_collection_with_nothing_published_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(BuildError, match="no images"):
        fake_build(tmp_path / "images", tmp_path / "index")


def test_compaction_into_an_ivf_segment_reuses_the_largest_segments_centroids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No k-means again: the merged IVF gets the big segment's centroids; with nprobe = nlist it stays exact."""
    import index_builder.build
    from image_search.faiss_index import ivf_centroids
    from image_search.index_spec import IndexSpec

    def small_ivf(n: int, total: int, d: int, **options: object) -> IndexSpec:
        return IndexSpec("IVF16,Flat", {"nprobe": 16})

    monkeypatch.setattr(index_builder.build, "choose_segment_index_spec", small_ivf)
    images, root = tmp_path / "images", tmp_path / "index"
    store = LocalStore(root)
    write_files(images, [f"a{i:04d}.jpg" for i in range(1200)])
    fake_build(images, root, merge_policy=NO_MERGES)
    (big,) = read_current_version(store).segments  # type: ignore[union-attr]
    write_files(images, [f"b{i}.jpg" for i in range(40)])
    fake_build(images, root, merge_policy=NO_MERGES)
    fake_build(images, root, compact=True)
    version = read_current_version(store)
    assert version is not None
    (merged,) = version.segments
    assert merged.index["factory"] == "IVF16,Flat" and merged.count == 1240
    cache = tmp_path / "cache"
    np.testing.assert_array_equal(
        ivf_centroids(open_segment_index(store, merged, cache)), ivf_centroids(open_segment_index(store, big, cache))
    )
    queries = np.stack([vector_of(bytes([i])) for i in range(5)])
    scores, ids = search_version(store, version, queries, 5, cache)
    want_scores, want_ids = brute_force(expected_live(images, store), queries, 5)
    assert ids.tolist() == want_ids.tolist()
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_a_local_segment_is_written_in_place_and_leaves_no_temporary_folder(tmp_path: Path) -> None:
    images, root = tmp_path / "images", tmp_path / "index"
    write_files(images, ["a.jpg", "b.jpg"])
    fake_build(images, root)
    (segment,) = read_current_version(LocalStore(root)).segments  # type: ignore[union-attr]
    assert sorted(p.name for p in (root / SEGMENTS).iterdir()) == [segment.name]
    assert sorted(p.name for p in (root / SEGMENTS / segment.name).iterdir()) == sorted(
        ["index.faiss", "vectors.npy", "records.json"]
    )
