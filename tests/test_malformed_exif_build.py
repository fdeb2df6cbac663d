"""A collection holding photos with malformed EXIF blocks builds (issue 21, item 4: one such file made
every build exit with a struct.error traceback and publish nothing)."""

from __future__ import annotations

from pathlib import Path

from tests import images
from tests.living import manifest_of
from tests.support import synthetic_image


def test_a_collection_with_malformed_exif_photos_builds_and_indexes_them(tmp_path: Path, tiny_model_dir: Path) -> None:
    from index_builder.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    for index, (fmt, problem) in enumerate(
        [("JPEG", "short_out_of_range"), ("WEBP", "negative_rational"), ("WEBP", "not_tiff")]
    ):
        suffix = "jpg" if fmt == "JPEG" else "webp"
        (photos / f"{index}.{suffix}").write_bytes(
            images.malformed_exif(fmt, synthetic_image(index, (96, 64)), problem)
        )
    (photos / "good.png").write_bytes(images.png(7, (96, 64)))
    out = tmp_path / "index"
    code = main(["--images", str(photos), "--out", str(out), "--model", str(tiny_model_dir), "--quiet"])
    assert code == 0
    version = (out / "CURRENT").read_text().strip()
    manifest = manifest_of(out, version)
    # The two whose EXIF only fails to be rewritten are indexed; the one whose EXIF is not TIFF is skipped.
    assert sorted(record["key"] for record in manifest["records"]) == ["0.jpg", "1.webp", "good.png"]
    assert [skipped["path"] for skipped in manifest["skipped"]] == ["2.webp"]
