"""Naming CLIP checkpoints: the default, how one is shown to people, and demo checkpoints."""

from __future__ import annotations

import json
from pathlib import Path, PurePath, PureWindowsPath

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
# Written into a checkpoint folder made up offline (random weights): its scores mean nothing, and
# the service says so on /info and on the page.
DEMO_MARKER = "DEMO_RANDOM_WEIGHTS"


def _looks_like_hub_id(text: str) -> bool:
    """`name` or `org/name`: no leading "/", ".", "~", no backslash, at most one "/"."""
    return bool(text) and not text.startswith(("/", ".", "~")) and "\\" not in text and text.count("/") <= 1


def _name_in_config(folder: Path) -> str | None:
    """The hub id a downloaded checkpoint's config.json names (`_name_or_path`), if it names one."""
    try:
        name = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and _looks_like_hub_id(name) else None


def model_display_name(model: str) -> str:
    """The name to show for a checkpoint: a hub id as it is; a folder by the hub id its config names,
    else by its last part. Never a path: where a model sits on a server is nobody's business.
    """
    text = model.rstrip("/\\")
    folder = Path(text).expanduser()
    if folder.is_dir():
        return _name_in_config(folder) or folder.resolve().name or "model"
    if _looks_like_hub_id(text):
        return text
    return PureWindowsPath(text).name if "\\" in text else PurePath(text).name or "model"


def is_demo_checkpoint(model: str) -> bool:
    """Whether `model` is a folder marked as a randomly initialised demo checkpoint."""
    return (Path(model).expanduser() / DEMO_MARKER).is_file()
