"""Incremental rebuild vs full build of the same collection (`index_builder.cli.main`, local engine).

A collection of generated 320x240 JPEGs (default 2000) is built from scratch, then 1% of it changes
(half of that edited in place, a quarter added, a quarter removed) and the same command runs again:
it embeds only the changed and added images and reuses the others' vectors from the published
index. Both builds run in this process, one after the other, in every round; the table gives their
wall times (model load included in both: it is part of what a user waits for) and the ratio. A
third run with nothing changed shows the fixed cost (listing, model load, no publish).

The incremental result is checked against the full build of the changed collection (same keys,
same vectors within 1e-5), so the speed is not bought with a wrong index.

    .venv/bin/python -m benchmarks.incremental_build [--images 2000] [--changed-percent 1] [--rounds 2] [--vit]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import CACHE_DIR, machine_note, median, print_table, verdict, vit_b32_checkpoint
from image_search.artifact import load_artifact
from image_search.faiss_index import reconstruct_vectors
from image_search.storage import LocalStore
from index_builder.cli import main as build_main
from tests.support import TINY, make_clip_checkpoint, synthetic_image

SIZE = (320, 240)
SPEEDUP_TARGET = 10.0


def write_collection(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for seed in range(count):
        path = folder / f"d{seed % 20:02d}" / f"img_{seed:05d}.jpg"
        if not path.is_file():
            path.parent.mkdir(exist_ok=True)
            synthetic_image(seed, SIZE).save(path, quality=90)


def change(folder: Path, count: int, changed: int, round_index: int) -> dict[str, int]:
    """Edit half of `changed` images in place, add a quarter, remove a quarter (at least one each)."""
    edits = max(1, changed // 2)
    adds = max(1, changed // 4)
    removes = max(1, changed - edits - adds)
    files = sorted(folder.rglob("*.jpg"))
    rng = np.random.default_rng(round_index)
    picked = rng.choice(len(files), edits + removes, replace=False)
    for offset, index in enumerate(picked[:edits]):
        synthetic_image(1_000_000 + offset + 1000 * round_index, SIZE).save(files[index], quality=90)
    for index in picked[edits:]:
        files[index].unlink()
    for offset in range(adds):
        path = folder / "added" / f"new_{round_index}_{offset:04d}.jpg"
        path.parent.mkdir(exist_ok=True)
        synthetic_image(2_000_000 + offset + 1000 * round_index, SIZE).save(path, quality=90)
    return {"edited": edits, "added": adds, "removed": removes}


def timed_build(images: Path, out: Path, model: Path) -> tuple[float, str]:
    output = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(output):
        code = build_main(["--images", str(images), "--out", str(out), "--model", str(model), "--quiet"])
    seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"the build failed: {output.getvalue()}")
    summary = next(line for line in output.getvalue().splitlines() if line.startswith("added "))
    return seconds, summary


def same_vectors(a: Path, b: Path) -> bool:
    left, right = load_artifact(LocalStore(a)), load_artifact(LocalStore(b))

    def by_key(artifact):  # type: ignore[no-untyped-def]
        ids = np.array([r.id for r in artifact.manifest.records], dtype=np.int64)
        return dict(
            zip((r.key for r in artifact.manifest.records), reconstruct_vectors(artifact.index, ids), strict=True)
        )

    lv, rv = by_key(left), by_key(right)
    return sorted(lv) == sorted(rv) and all(np.allclose(lv[key], rv[key], atol=1e-5) for key in lv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--changed-percent", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--vit", action="store_true", help="a ViT-B/32-sized checkpoint instead of the tiny one")
    args = parser.parse_args(argv)
    changed = max(3, round(args.images * args.changed_percent / 100))
    model = vit_b32_checkpoint() if args.vit else make_clip_checkpoint(CACHE_DIR / "clip-tiny", TINY)
    model_name = "ViT-B/32-sized" if args.vit else "tiny"
    print(
        f"incremental_build: {machine_note()}, {args.images} x {SIZE[0]}x{SIZE[1]} JPEG, "
        f"{changed} changed ({args.changed_percent}%), {model_name} CLIP, {args.rounds} rounds"
    )
    source = CACHE_DIR / f"incremental-{args.images}"
    write_collection(source, args.images)

    rows, ratios = [], []
    for round_index in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="incremental-", dir=CACHE_DIR) as work:
            images, out, reference = Path(work) / "images", Path(work) / "out", Path(work) / "reference"
            shutil.copytree(source, images)
            full_s, _ = timed_build(images, out, model)
            what = change(images, args.images, changed, round_index)
            incremental_s, summary = timed_build(images, out, model)
            unchanged_s, _ = timed_build(images, out, model)
            reference_s, _ = timed_build(images, reference, model)  # a full build of the changed collection
            equal = same_vectors(out, reference)
        ratios.append(full_s / incremental_s)
        rows.append(
            [
                round_index + 1,
                f"{what['edited']} edited, {what['added']} added, {what['removed']} removed",
                full_s,
                reference_s,
                incremental_s,
                unchanged_s,
                ratios[-1],
                "yes" if equal else "NO",
                summary,
            ]
        )
    print_table(
        f"Full build vs incremental rebuild, {args.images} images, {changed} changed, local engine",
        [
            "round",
            "change",
            "full build s",
            "full build of changed s",
            "incremental s",
            "nothing changed s",
            "full / incremental",
            "incremental == full",
            "builder printed",
        ],
        rows,
    )
    verdict("full build / incremental rebuild", median(ratios), SPEEDUP_TARGET, unit="x")
    return 0 if all(row[7] == "yes" for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
