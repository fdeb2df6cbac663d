"""What a build indexes of a store: image files by extension, hidden ones left out, and the files
it cannot index named with the reason (they are listed among the skipped files of the build)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from image_search.decoding import IMAGE_EXTENSIONS
from image_search.storage import Entry, Store, printable_key, undecodable_name

UNDECODABLE_NAME = "file name is not valid UTF-8: rename it (to UTF-8) to index it"


@dataclass(frozen=True)
class Listing:
    entries: list[Entry]  # the images to index, sorted by key
    skipped: list[tuple[str, str]]  # (printable key, reason) of images that cannot be indexed, sorted


def is_image_key(key: str) -> bool:
    path = PurePosixPath(key)
    return path.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in path.parts)


def list_images(store: Store) -> Listing:
    """Every image file under the store, sorted by key; hidden files left out.

    A name that is not valid UTF-8 is skipped with the reason: its key could not be written into a
    JSON answer (every search ranking it would fail) nor asked for by URL.
    """
    entries: list[Entry] = []
    skipped: list[tuple[str, str]] = []
    for entry in store.iter_entries():
        if not is_image_key(entry.key):
            continue
        if undecodable_name(entry.key):
            skipped.append((printable_key(entry.key), UNDECODABLE_NAME))
        else:
            entries.append(entry)
    return Listing(sorted(entries, key=lambda e: e.key), sorted(skipped))
