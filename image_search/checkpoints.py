"""Naming CLIP checkpoints: the default, and how one is shown to people."""

from __future__ import annotations

from pathlib import PurePath

DEFAULT_MODEL = "openai/clip-vit-base-patch32"


def model_display_name(model: str) -> str:
    """The name to show for a checkpoint: a hub id as it is, a folder by its last part, never a path.

    A hub id has at most one "/" and no leading one; anything else is a location on this machine,
    which is nobody's business outside it.
    """
    text = model.rstrip("/\\")
    looks_like_hub_id = not text.startswith((".", "/", "~")) and text.count("/") <= 1 and "\\" not in text
    if looks_like_hub_id and not PurePath(text).is_absolute():
        return text
    return PurePath(text).name or "model"
