"""The collection diff and id assignment: pure functions, no files."""

from __future__ import annotations

import pytest

from image_search.manifest import ImageRecord, Manifest
from image_search.storage import Entry
from index_builder.diff import assign_ids, diff_collection, full_diff, keys_to_hash
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
