"""Fill data/images and data/model for scripts/run.sh without ever touching a folder the user filled.

    python scripts/data_dirs.py [data]   -> fills what is missing; prints the builder's extra flags on
                                            stdout (messages on stderr); exit 1 with what to do when a
                                            folder blocks the way

A folder is one of:
- empty (or missing): run.sh fills it: COCO 128 / the real CLIP when the internet is reachable,
  otherwise generated demo pictures / a random CLIP;
- run.sh's: it holds exactly what run.sh wrote there (every file, size and sha256, as recorded in
  data/.run_sh/<folder>.json when it wrote them); demo data of run.sh's is replaced by the real data
  once the internet is reachable, and nothing else of run.sh's is ever replaced;
- the user's: anything else (their photos, their checkpoint, run.sh's data they changed). Never
  written to, moved or deleted. A user's data/model without a checkpoint stops run.sh with a message.

Everything new is written into data/.run_sh/ first and moved into place only when complete; the
folder it replaces is checked again right before (still exactly run.sh's) and only then removed.
data/index is never touched here: the builder brings it up to date (a new model rebuilds it in full,
saying why), and is told to accept the removals when run.sh replaced its demo pictures.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from image_search.checkpoints import DEMO_MARKER

RECORDS = ".run_sh"  # under data/: what run.sh wrote, and its staging folders
CHECKPOINT_FILE = "config.json"
DEMO, REAL = "demo", "real"
# The builder's flag for a build that removes most of the published images (the demo pictures).
ALLOW_REPLACING_IMAGES = "--allow-mass-removal"

Fill = Callable[[Path], None]  # writes a folder's content into the (new, empty) folder given


@dataclass(frozen=True)
class State:
    kind: str  # "empty", "run.sh" or "user"
    written: str | None = None  # run.sh's folders: DEMO or REAL


@dataclass(frozen=True)
class Sources:
    """How to fill each folder (the real ones need the internet and raise when it is not there)."""

    real_images: Fill
    real_model: Fill
    demo_images: Fill
    demo_model: Fill


def file_listing(folder: Path) -> dict[str, list]:
    """relative path -> [size, sha256] of every file under `folder` (links not followed)."""
    listing: dict[str, list] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
            listing[path.relative_to(folder).as_posix()] = [path.stat().st_size, digest.hexdigest()]
        elif path.is_symlink():
            listing[path.relative_to(folder).as_posix()] = ["link", str(path.readlink())]
    return listing


def record_path(data: Path, name: str) -> Path:
    return data / RECORDS / f"{name}.json"


def folder_state(data: Path, name: str) -> State:
    folder = data / name
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return State("empty")
    record_file = record_path(data, name)
    if folder.is_dir() and record_file.is_file():
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):
            return State("user")
        if record.get("files") == file_listing(folder):
            return State("run.sh", record.get("written"))
    return State("user")


def install(data: Path, name: str, written: str, fill: Fill) -> None:
    """Fill a staging folder, then put it in place of data/<name> (empty, or still exactly run.sh's)."""
    records = data / RECORDS
    records.mkdir(parents=True, exist_ok=True)
    staging = records / f"new-{name}"
    shutil.rmtree(staging, ignore_errors=True)  # a staging folder is ours by construction
    staging.mkdir()
    try:
        fill(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    target = data / name
    # Checked again now: the user may have put files there while we downloaded.
    before = folder_state(data, name)
    if before.kind == "user":
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"{target} was filled meanwhile; left as it is")
    old = records / f"old-{name}"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)  # empty or exactly run.sh's: nothing of the user's is in it
    staging.rename(target)
    record_path(data, name).write_text(json.dumps({"written": written, "files": file_listing(target)}))
    shutil.rmtree(old, ignore_errors=True)


def prepare(data: Path, sources: Sources, say: Callable[[str], None] = print) -> list[str]:
    """Fill what is empty and upgrade run.sh's demo data; returns the builder's extra flags.

    Raises SystemExit(1) with a message when the user's data/model holds no checkpoint."""
    data.mkdir(parents=True, exist_ok=True)
    flags: list[str] = []
    model = folder_state(data, "model")
    if model.kind == "user" and not (data / "model" / CHECKPOINT_FILE).is_file():
        say(
            f"run.sh: {data / 'model'} holds files but no CLIP checkpoint ({CHECKPOINT_FILE}); it is left as it "
            "is. Put a checkpoint folder there (save_pretrained's files), or move those files away so that "
            "run.sh can fetch the real CLIP (or make a demo model offline)."
        )
        raise SystemExit(1)
    images = folder_state(data, "images")
    for name, state, real, demo in (
        ("model", model, sources.real_model, sources.demo_model),
        ("images", images, sources.real_images, sources.demo_images),
    ):
        if state.kind == "user" or state.written == REAL:
            if state.kind == "user" and name == "model" and (data / "model" / DEMO_MARKER).exists():
                say(
                    f"run.sh: {data / 'model'} holds demo weights that are not run.sh's as written (changed, or "
                    "from an older run.sh): kept. To get the real CLIP, move that folder away and run again."
                )
            continue
        try:
            install(data, name, REAL, real)
            say(f"run.sh: {data / name}: {'COCO 128' if name == 'images' else 'the real CLIP'} fetched")
            if name == "images" and state.written == DEMO:
                flags.append(ALLOW_REPLACING_IMAGES)  # the index's demo pictures are all removed
        except Exception as exc:  # offline, a proxy, a full disk: the demo data (or what is there) serves
            if state.kind == "run.sh":
                say(f"run.sh: still offline ({exc}): keeping the demo data in {data / name} (the page says so)")
                continue
            say(f"run.sh: cannot fetch into {data / name} ({exc}); making demo data instead")
            install(data, name, DEMO, demo)
    return flags


def real_sources() -> Sources:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fetch_coco128
    import make_demo_data

    return Sources(
        real_images=lambda dest: require_some(fetch_coco128.fetch_images(dest)),
        real_model=lambda dest: fetch_coco128.fetch_model(fetch_coco128.DEFAULT_MODEL, dest),
        demo_images=make_demo_data.make_demo_images,
        demo_model=make_demo_data.make_demo_model,
    )


def require_some(count: int) -> None:
    if count == 0:
        raise RuntimeError("the COCO 128 archive held no images")


def main(argv: list[str]) -> int:
    data = Path(argv[0] if argv else "data")
    try:
        flags = prepare(data, real_sources(), say=lambda line: print(line, file=sys.stderr))
    except SystemExit as exc:
        return int(exc.code or 0)
    print(" ".join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
