"""The collection diff and id assignment: pure functions, no files."""

from __future__ import annotations

import pytest

from image_search.manifest import ImageRecord, Manifest
from image_search.storage import Entry
from index_builder.diff import (
    assign_ids,
    diff_collection,
    distrust_fresh_mtimes,
    full_diff,
    keys_to_hash,
    removal_refusal,
)
from tests.support import sample_manifest


def published(*records: ImageRecord, next_id: int = 10) -> Manifest:
    return sample_manifest(records, next_id=next_id)


PREVIOUS = published(
    ImageRecord(0, "a.jpg", 100, "ha", 1),
    ImageRecord(3, "b.jpg", 200, "hb", 2),
    ImageRecord(5, "c.jpg", 300, "hc", 3),
    ImageRecord(9, "d.jpg", 400, "hd", None),
)


def test_first_build_adds_everything_in_key_order() -> None:
    listing = [Entry("b.jpg", 1, 1), Entry("a.jpg", 1, 1)]
    assert keys_to_hash(listing, None) == []
    diff = diff_collection(listing, None, {})
    assert diff.added == ("a.jpg", "b.jpg") and not diff.changed and not diff.removed and not diff.unchanged


def test_cheap_checks_settle_what_they_can_and_the_hash_decides_the_rest() -> None:
    listing = [
        Entry("a.jpg", 100, 1),  # same size and mtime: unchanged, not read
        Entry("b.jpg", 201, 2),  # other size: changed, not read
        Entry("c.jpg", 300, 99),  # same size, other mtime: hashed -> same bytes (touched)
        Entry("d.jpg", 400, 7),  # same size, unknown published mtime: hashed -> other bytes
        Entry("e.jpg", 50, 1),  # new
    ]
    assert keys_to_hash(listing, PREVIOUS) == ["c.jpg", "d.jpg"]
    diff = diff_collection(listing, PREVIOUS, {"c.jpg": "hc", "d.jpg": "new"})
    assert diff.added == ("e.jpg",)
    assert [r.key for r in diff.changed] == ["b.jpg", "d.jpg"]
    assert diff.unchanged == (ImageRecord(0, "a.jpg", 100, "ha", 1), ImageRecord(5, "c.jpg", 300, "hc", 99))
    assert diff.removed == ()
    assert diff.to_embed == ("b.jpg", "d.jpg", "e.jpg")


def test_a_missing_key_is_removed() -> None:
    diff = diff_collection([Entry("a.jpg", 100, 1)], PREVIOUS, {})
    assert [r.id for r in diff.removed] == [3, 5, 9]


def test_a_needed_hash_that_is_missing_is_an_error_not_a_guess() -> None:
    with pytest.raises(ValueError, match=r"c\.jpg"):
        diff_collection([Entry("c.jpg", 300, 99)], PREVIOUS, {})


def test_changed_images_keep_their_id_and_new_ones_never_reuse_a_removed_id() -> None:
    listing = [Entry("a.jpg", 100, 1), Entry("b.jpg", 201, 2), Entry("0new.jpg", 1, 1), Entry("z.jpg", 1, 1)]
    diff = diff_collection(listing, PREVIOUS, {})  # c and d removed: ids 5 and 9 retired
    fresh = [ImageRecord(-1, key, 1, "h") for key in ("z.jpg", "b.jpg", "0new.jpg")]
    records, next_id = assign_ids(diff, fresh, PREVIOUS.next_id)
    assert [(r.key, r.id) for r in records] == [("0new.jpg", 10), ("a.jpg", 0), ("b.jpg", 3), ("z.jpg", 11)]
    assert next_id == 12


def test_a_changed_image_that_no_longer_decodes_is_dropped() -> None:
    diff = diff_collection([Entry("a.jpg", 100, 1), Entry("b.jpg", 201, 2)], PREVIOUS, {})
    records, next_id = assign_ids(diff, [], PREVIOUS.next_id)  # b.jpg was skipped
    assert [r.key for r in records] == ["a.jpg"] and next_id == 10


def test_full_diff_embeds_everything_and_keeps_ids() -> None:
    listing = [Entry("a.jpg", 100, 1), Entry("new.jpg", 5, 5)]
    diff = full_diff(listing, PREVIOUS)
    assert diff.added == ("new.jpg",) and [r.key for r in diff.changed] == ["a.jpg"] and not diff.unchanged
    assert [r.id for r in diff.removed] == [3, 5, 9]
    records, next_id = assign_ids(diff, [ImageRecord(-1, "a.jpg", 100, "ha"), ImageRecord(-1, "new.jpg", 5, "n")], 10)
    assert [(r.key, r.id) for r in records] == [("a.jpg", 0), ("new.jpg", 10)] and next_id == 11


def test_a_new_key_is_hashed_only_when_a_removed_record_has_its_size() -> None:
    # b.jpg (200 bytes) and c.jpg (300) are gone; of the new keys only the 200-byte one may be b.jpg.
    listing = [Entry("a.jpg", 100, 1), Entry("d.jpg", 400, None), Entry("x.jpg", 200, 5), Entry("y.jpg", 999, 5)]
    assert keys_to_hash(listing, PREVIOUS) == ["d.jpg", "x.jpg"]
    # A pure addition (nothing removed) costs no read.
    everything = [Entry(r.key, r.size, r.mtime_ns) for r in PREVIOUS.records]
    assert keys_to_hash([*everything[:3], Entry("d.jpg", 400, 1), Entry("new.jpg", 100, 1)], PREVIOUS) == ["d.jpg"]


def test_a_renamed_image_keeps_its_id_under_the_new_key() -> None:
    listing = [Entry("a.jpg", 100, 1), Entry("d.jpg", 400, None), Entry("2024/b.jpg", 200, 77), Entry("x.jpg", 300, 8)]
    # 2024/b.jpg holds b.jpg's bytes: moved. x.jpg has c.jpg's size, other bytes: a new image.
    diff = diff_collection(listing, PREVIOUS, {"d.jpg": "hd", "2024/b.jpg": "hb", "x.jpg": "other"})
    assert diff.moved == 1
    assert diff.added == ("x.jpg",)
    assert [r.key for r in diff.removed] == ["c.jpg"]
    assert ImageRecord(3, "2024/b.jpg", 200, "hb", 77) in diff.unchanged
    assert diff.to_embed == ("x.jpg",)
    records, next_id = assign_ids(diff, [ImageRecord(-1, "x.jpg", 300, "other")], PREVIOUS.next_id)
    assert [(r.key, r.id) for r in records] == [("2024/b.jpg", 3), ("a.jpg", 0), ("d.jpg", 9), ("x.jpg", 10)]
    assert next_id == 11


def test_copies_of_a_removed_image_take_its_id_once() -> None:
    listing = [Entry("a.jpg", 100, 1), Entry("c.jpg", 300, 3), Entry("d.jpg", 400, None)]
    listing += [Entry("copy1/b.jpg", 200, 9), Entry("copy2/b.jpg", 200, 9)]
    diff = diff_collection(listing, PREVIOUS, {"d.jpg": "hd", "copy1/b.jpg": "hb", "copy2/b.jpg": "hb"})
    assert diff.moved == 1 and diff.added == ("copy2/b.jpg",) and diff.removed == ()
    assert [r.id for r in diff.unchanged if r.key == "copy1/b.jpg"] == [3]


def test_a_touched_file_is_restamped_and_that_is_worth_publishing() -> None:
    listing = [Entry("a.jpg", 100, 1), Entry("b.jpg", 200, 2), Entry("c.jpg", 300, 99), Entry("d.jpg", 400, 4)]
    diff = diff_collection(listing, PREVIOUS, {"c.jpg": "hc", "d.jpg": "hd"})
    # c.jpg touched (new stamp), d.jpg had no stamp published and gets one: both are recorded.
    assert diff.restamped == 2 and diff.rewrites_records
    assert {r.key: r.mtime_ns for r in diff.unchanged} == {"a.jpg": 1, "b.jpg": 2, "c.jpg": 99, "d.jpg": 4}
    untouched = diff_collection(listing[:2], published(*PREVIOUS.records[:2]), {})
    assert untouched.restamped == 0 and not untouched.rewrites_records


def test_an_untrusted_stamp_is_hashed_and_never_counts_as_a_restamp() -> None:
    diff = diff_collection([Entry("a.jpg", 100, None)], published(PREVIOUS.records[0]), {"a.jpg": "ha"})
    assert diff.unchanged == (ImageRecord(0, "a.jpg", 100, "ha", None),) and not diff.rewrites_records


def test_stamps_within_the_margin_of_the_first_read_are_forgotten() -> None:
    listing = [Entry("old.jpg", 1, 1_000), Entry("edge.jpg", 1, 1_900), Entry("fresh.jpg", 1, 1_901)]
    listing += [Entry("future.jpg", 1, 5_000), Entry("unknown.jpg", 1, None)]
    trusted = distrust_fresh_mtimes(listing, reads_from_ns=2_000, margin_ns=100)
    assert [e.mtime_ns for e in trusted] == [1_000, 1_900, None, None, None]


def test_removing_more_than_the_share_is_refused() -> None:
    listing = [Entry("a.jpg", 100, 1)]  # 3 of 4 removed
    diff = diff_collection(listing, PREVIOUS, {})
    refusal = removal_refusal(diff, len(PREVIOUS.records), 0.5)
    assert refusal is not None and "remove 3 of the 4 published images (75%" in refusal
    assert removal_refusal(diff, len(PREVIOUS.records), 0.75) is None
    two_left = diff_collection([*listing, Entry("b.jpg", 200, 2)], PREVIOUS, {})
    assert removal_refusal(two_left, len(PREVIOUS.records), 0.5) is None  # exactly half
    assert removal_refusal(diff, 0, 0.5) is None  # nothing published: nothing to remove
