"""Offline stand-in for COCO 128 + CLIP: generated pictures and a randomly initialised CLIP.

For machines without internet, so the service can still be started and clicked through. The
search results of a random model are not meaningful; `scripts/fetch_coco128.py` gets the real ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from image_search.checkpoints import DEMO_MARKER
from tests.support import TINY, VIT_B_32, make_clip_checkpoint, write_image_folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", default="data/images")
    parser.add_argument("--model-dir", default="data/model")
    parser.add_argument("--count", type=int, default=128)
    parser.add_argument("--full-size", action="store_true", help="ViT-B/32 sizes instead of a tiny model")
    args = parser.parse_args()
    write_image_folder(Path(args.images), args.count)
    make_clip_checkpoint(Path(args.model_dir), VIT_B_32 if args.full_size else TINY)
    # The service reads this marker and says "demo data: random model, scores mean nothing" on /info and the page.
    (Path(args.model_dir) / DEMO_MARKER).write_text("randomly initialised weights: search scores mean nothing\n")
    print(f"DEMO DATA: {args.count} generated images in {args.images}, a random CLIP in {args.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
