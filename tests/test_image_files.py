"""What /images/{id} sends, without Ray: only the record's bytes, from inside the collection, streamed;
and thumbnails cached on disk by content hash (one decode per image and size)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from image_search.errors import IndexedImageChanged, IndexedImageUnreadable
from image_search.manifest import ImageRecord
from image_search.storage import LocalStore, OutsideStore, open_inside
from serve_app import image_files
from serve_app.image_files import original_chunks, read_verified
from serve_app.thumbnails import ThumbnailDiskCache, cached_thumbnail


def record_of(root: Path, key: str, image_id: int = 0) -> ImageRecord:
    data = (root / key).read_bytes()
    return ImageRecord(id=image_id, key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest())


@pytest.fixture
def collection(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "trip").mkdir(parents=True)
    (root / "trip" / "a.jpg").write_bytes(b"A" * 1000)
    return root


def test_a_link_out_of_the_collection_under_an_indexed_name_never_serves_the_secret(
    collection: Path, tmp_path: Path
) -> None:
    record = record_of(collection, "trip/a.jpg")
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"S" * record.size)  # the same size: only the link check can catch it
    (collection / "trip" / "a.jpg").unlink()
    (collection / "trip" / "a.jpg").symlink_to(secret)
    store = LocalStore(collection)
    with pytest.raises(OutsideStore):
        open_inside(collection, "trip/a.jpg")
    for serve in (original_chunks, read_verified):
        with pytest.raises(IndexedImageChanged) as caught:
            serve(store, record)  # type: ignore[operator]
        assert caught.value.status == 409 and "secret" not in caught.value.message


def test_a_linked_folder_out_of_the_collection_is_refused_and_a_link_inside_is_followed(
    collection: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "b.jpg").write_bytes(b"B" * 10)
    (collection / "linked").symlink_to(outside, target_is_directory=True)
    (collection / "same.jpg").symlink_to(collection / "trip" / "a.jpg")
    with pytest.raises(OutsideStore):
        open_inside(collection, "linked/b.jpg")
    with open_inside(collection, "same.jpg") as handle:
        assert handle.read() == b"A" * 1000


def test_bytes_that_are_not_the_records_are_never_served(collection: Path) -> None:
    record = record_of(collection, "trip/a.jpg")
    store = LocalStore(collection)
    (collection / "trip" / "a.jpg").write_bytes(b"B" * 1000)  # same size, other bytes
    with pytest.raises(IndexedImageChanged):
        original_chunks(store, record)
    (collection / "trip" / "a.jpg").write_bytes(b"A" * 999)  # other size
    with pytest.raises(IndexedImageChanged):
        original_chunks(store, record)
    (collection / "trip" / "a.jpg").unlink()
    with pytest.raises(IndexedImageUnreadable):
        original_chunks(store, record)


def test_a_large_original_is_streamed_in_chunks_never_read_whole(
    collection: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image_files, "HASH_CHECKED_MAX_BYTES", 100)
    (collection / "big.png").write_bytes(os.urandom(10_000))
    record = record_of(collection, "big.png")
    reads: list[int] = []
    real_open = image_files.open_inside

    def counting_open(root: Path, key: str):  # type: ignore[no-untyped-def]
        handle = real_open(root, key)
        real_read = handle.read

        def read(size: int = -1) -> bytes:
            reads.append(size)
            return real_read(size)

        handle.read = read  # type: ignore[method-assign]
        return handle

    monkeypatch.setattr(image_files, "open_inside", counting_open)
    chunks = original_chunks(LocalStore(collection), record, chunk_bytes=1024)
    first = next(chunks)
    assert len(first) == 1024 and reads == [1024, 1024]  # one chunk out, one held back: never the whole file
    assert first + b"".join(chunks) == (collection / "big.png").read_bytes()
    assert all(size == 1024 for size in reads)


def test_a_large_original_that_changed_is_cut_before_its_last_chunk(
    collection: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image_files, "HASH_CHECKED_MAX_BYTES", 100)
    (collection / "big.png").write_bytes(b"x" * 5000)
    record = record_of(collection, "big.png")
    (collection / "big.png").write_bytes(b"y" * 5000)
    received = []
    with pytest.raises(IndexedImageChanged):
        for chunk in original_chunks(LocalStore(collection), record, chunk_bytes=1024):
            received.append(chunk)
    assert sum(map(len, received)) < record.size


def test_thumbnails_are_decoded_once_per_image_and_size_across_caches_on_one_folder(tmp_path: Path) -> None:
    decodes: list[str] = []

    def make(name: str) -> bytes:
        decodes.append(name)
        return f"jpeg of {name}".encode()

    folder = tmp_path / "thumbs"
    first = ThumbnailDiskCache(folder)
    for _ in range(3):
        assert cached_thumbnail(first, "ab" * 32, 128, lambda: make("a128")) == b"jpeg of a128"
    cached_thumbnail(first, "ab" * 32, 256, lambda: make("a256"))
    # Another replica (or this one restarted, its memory cache gone) on the same folder: no decode.
    second = ThumbnailDiskCache(folder)
    assert cached_thumbnail(second, "ab" * 32, 128, lambda: make("again")) == b"jpeg of a128"
    assert decodes == ["a128", "a256"]
    with pytest.raises(ValueError):
        first.path("../../etc/passwd", 128)


def test_the_thumbnail_folder_stays_within_its_limit_least_recently_used_out(tmp_path: Path) -> None:
    cache = ThumbnailDiskCache(tmp_path, max_bytes=10_000)
    for index in range(30):
        digest = f"{index:064x}"
        cache.put(digest, 128, b"t" * 1000)
        os.utime(cache.path(digest, 128), ns=(index * 10**9, index * 10**9))  # used in this order
    stored = sum(path.stat().st_size for path in tmp_path.glob("*.jpg"))
    assert stored <= 10_000
    assert cache.get(f"{29:064x}", 128) is not None  # the newest stays
    assert cache.get(f"{1:064x}", 128) is None  # an old one went
