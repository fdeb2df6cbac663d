"""scripts/run.sh's data folders (scripts/data_dirs.py): it fills empty ones, upgrades its own demo
data once online, and never writes to, moves or deletes a folder the user filled."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("data_dirs", REPO_ROOT / "scripts" / "data_dirs.py")
assert spec is not None and spec.loader is not None
data_dirs = importlib.util.module_from_spec(spec)
sys.modules["data_dirs"] = data_dirs  # its dataclasses look their module up there
spec.loader.exec_module(data_dirs)


class Offline(Exception):
    pass


class FakeSources:
    """Stand-ins for the downloads and the demo generator, recording what was asked of them."""

    def __init__(self, online: bool) -> None:
        self.online = online
        self.calls: list[str] = []

    def sources(self) -> object:
        return data_dirs.Sources(
            real_images=lambda dest: self.fill("real_images", dest, {"000000000009.jpg": b"coco"}),
            real_model=lambda dest: self.fill("real_model", dest, {"config.json": b"{}", "model.safetensors": b"w"}),
            demo_images=lambda dest: self.fill("demo_images", dest, {"img_0000.jpg": b"demo"}, needs_network=False),
            demo_model=lambda dest: self.fill(
                "demo_model", dest, {"config.json": b"{}", data_dirs.DEMO_MARKER: b"random"}, needs_network=False
            ),
        )

    def fill(self, what: str, dest: Path, files: dict[str, bytes], needs_network: bool = True) -> None:
        self.calls.append(what)
        if needs_network and not self.online:
            raise Offline("no route to host")
        for name, data in files.items():
            (dest / name).write_bytes(data)


def run(data: Path, online: bool) -> tuple[list[str], list[str]]:
    fakes = FakeSources(online)
    flags = data_dirs.prepare(data, fakes.sources(), say=lambda line: None)
    return flags, fakes.calls


def snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.mark.parametrize("online", [False, True])
def test_the_users_photo_survives_and_only_the_model_is_filled(tmp_path: Path, online: bool) -> None:
    data = tmp_path / "data"
    (data / "images" / "2024").mkdir(parents=True)
    (data / "images" / "2024" / "holiday.jpg").write_bytes(b"my own photo")
    before = snapshot(data / "images")
    flags, calls = run(data, online)
    assert snapshot(data / "images") == before
    assert "real_images" not in calls and "demo_images" not in calls
    assert (data / "model" / "config.json").is_file()
    assert (data / "model" / data_dirs.DEMO_MARKER).exists() == (not online)
    assert flags == []
    # And again, online: the photos are still the user's; only run.sh's demo model is upgraded.
    flags, calls = run(data, online=True)
    assert snapshot(data / "images") == before and "real_images" not in calls
    assert not (data / "model" / data_dirs.DEMO_MARKER).exists()


def test_empty_folders_get_demo_data_offline_and_the_real_data_once_online(tmp_path: Path) -> None:
    data = tmp_path / "data"
    flags, calls = run(data, online=False)
    assert calls == ["real_model", "demo_model", "real_images", "demo_images"] and flags == []
    assert sorted(snapshot(data / "images")) == ["img_0000.jpg"]
    flags, calls = run(data, online=False)  # still offline: the demo data stays, nothing is made again
    assert calls == ["real_model", "real_images"] and sorted(snapshot(data / "images")) == ["img_0000.jpg"]
    flags, calls = run(data, online=True)
    assert calls == ["real_model", "real_images"]
    assert sorted(snapshot(data / "images")) == ["000000000009.jpg"]
    assert sorted(snapshot(data / "model")) == ["config.json", "model.safetensors"]
    assert flags == ["--allow-mass-removal"]  # the builder may drop the demo pictures from the index
    flags, calls = run(data, online=True)  # the real data is never fetched again
    assert calls == [] and flags == []


def test_demo_pictures_the_user_added_to_are_theirs_now(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run(data, online=False)
    (data / "images" / "mine.jpg").write_bytes(b"added by the user")
    before = snapshot(data / "images")
    flags, calls = run(data, online=True)
    assert snapshot(data / "images") == before and "real_images" not in calls
    assert "real_model" in calls and not (data / "model" / data_dirs.DEMO_MARKER).exists()
    assert flags == []


def test_a_users_model_folder_without_a_checkpoint_stops_with_what_to_do(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "model").mkdir(parents=True)
    (data / "model" / "notes.txt").write_bytes(b"mine")
    said: list[str] = []
    with pytest.raises(SystemExit) as stopped:
        data_dirs.prepare(data, FakeSources(True).sources(), say=said.append)
    assert stopped.value.code == 1
    assert "holds files but no CLIP checkpoint" in said[0] and "move those files away" in said[0]
    assert snapshot(data / "model") == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


def test_a_users_checkpoint_is_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "model").mkdir(parents=True)
    (data / "model" / "config.json").write_bytes(b'{"mine": true}')
    _, calls = run(data, online=True)
    assert "real_model" not in calls and (data / "model" / "config.json").read_bytes() == b'{"mine": true}'


def test_the_script_itself_leaves_a_users_folders_alone(tmp_path: Path) -> None:
    """The real script as run.sh runs it (no network needed: nothing is to be fetched)."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "cat.png").write_bytes(b"a user's cat")
    (data / "model").mkdir()
    (data / "model" / "config.json").write_text("{}")
    before = snapshot(data)
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "data_dirs.py"), str(data)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""  # no extra builder flags
    assert snapshot(data) == before
