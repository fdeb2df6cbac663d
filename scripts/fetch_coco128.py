"""Fetch COCO 128 into data/images and the CLIP checkpoint into data/model (needs internet).

COCO 128 is the first 128 images of COCO train2017, as packaged by Ultralytics.
"""

from __future__ import annotations

import argparse
import io
import sys
import urllib.request
import zipfile
from pathlib import Path

COCO128_URL = "https://github.com/ultralytics/assets/releases/download/v0.0.0/coco128.zip"
DEFAULT_MODEL = "openai/clip-vit-base-patch32"


def fetch_images(dest: Path) -> int:
    with urllib.request.urlopen(COCO128_URL, timeout=120) as response:
        archive = zipfile.ZipFile(io.BytesIO(response.read()))
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    for member in archive.namelist():
        if member.lower().endswith(".jpg") and "/images/" in member:
            (dest / Path(member).name).write_bytes(archive.read(member))
            count += 1
    return count


def fetch_model(model: str, dest: Path) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(model, local_dir=dest, allow_patterns=["*.json", "*.safetensors", "*.txt"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", default="data/images")
    parser.add_argument("--model-dir", default="data/model")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    try:
        count = fetch_images(Path(args.images))
        fetch_model(args.model, Path(args.model_dir))
    except OSError as exc:
        print(f"fetch failed (is there internet access?): {exc}", file=sys.stderr)
        return 1
    print(f"{count} COCO 128 images in {args.images}, {args.model} in {args.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
