"""Offline stand-in for COCO 128 + CLIP: generated pictures and a randomly initialised CLIP.

For machines without internet, so the service can still be started and clicked through. The
search results of a random model are not meaningful; `scripts/fetch_coco128.py` gets the real ones.
(scripts/run.sh calls this through scripts/data_dirs.py, which fills only empty folders.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from image_search.checkpoints import DEMO_MARKER
from image_search.demo_data import TINY, VIT_B_32, make_clip_checkpoint, write_image_folder

DEMO_IMAGES = 128


def make_demo_images(folder: Path, count: int = DEMO_IMAGES) -> None:
    write_image_folder(Path(folder), count)


def make_demo_model(folder: Path, full_size: bool = False) -> None:
    make_clip_checkpoint(Path(folder), VIT_B_32 if full_size else TINY)
    # The service reads this marker and says "demo data: random model, scores mean nothing" on /info and the page.
    (Path(folder) / DEMO_MARKER).write_text("randomly initialised weights: search scores mean nothing\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", default="data/images")
    parser.add_argument("--model-dir", default="data/model")
    parser.add_argument("--count", type=int, default=DEMO_IMAGES)
    parser.add_argument("--full-size", action="store_true", help="ViT-B/32 sizes instead of a tiny model")
    args = parser.parse_args()
    make_demo_images(Path(args.images), args.count)
    make_demo_model(Path(args.model_dir), args.full_size)
    print(f"DEMO DATA: {args.count} generated images in {args.images}, a random CLIP in {args.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
