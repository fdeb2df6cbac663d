"""How a checkpoint is named to people: never a server path."""

from __future__ import annotations

from pathlib import Path

import pytest

from image_search.checkpoints import DEMO_MARKER, is_demo_checkpoint, model_display_name


@pytest.mark.parametrize(
    ("model", "shown"),
    [
        ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32"),
        ("clip-vit-base-patch32", "clip-vit-base-patch32"),
        ("/srv/models/clip-b32", "clip-b32"),
        ("/srv/models/clip-b32/", "clip-b32"),
        ("./checkpoints/mine", "mine"),
        ("~/models/clip", "clip"),
        ("C:\\models\\clip", "clip"),
    ],
)
def test_a_hub_id_is_shown_as_is_and_a_folder_by_its_last_part(model: str, shown: str) -> None:
    assert model_display_name(model) == shown


def test_a_checkpoint_folder_is_named_by_its_config_or_its_last_part(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    assert model_display_name(str(folder)) == "model"
    (folder / "config.json").write_text('{"_name_or_path": "openai/clip-vit-base-patch32"}')
    assert model_display_name(str(folder)) == "openai/clip-vit-base-patch32"
    (folder / "config.json").write_text('{"_name_or_path": "/home/someone/clip"}')
    assert model_display_name(str(folder) + "/") == "model"


def test_demo_checkpoints_are_recognised_by_their_marker(tmp_path: Path) -> None:
    assert not is_demo_checkpoint(str(tmp_path))
    (tmp_path / DEMO_MARKER).write_text("random weights")
    assert is_demo_checkpoint(str(tmp_path))
    assert not is_demo_checkpoint("openai/clip-vit-base-patch32")
