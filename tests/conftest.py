"""Session fixtures: one tiny CLIP checkpoint, one image collection, one index, one Serve instance.

Starting Ray and Serve costs ~15 s, so every HTTP test shares the application started here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from tests.support import free_port, make_clip_checkpoint, write_image_folder

if TYPE_CHECKING:
    from serve_app.config import AppArgs

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_NAME = "image_search"
COLLECTION_SIZE = 24
STARTUP_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 15.0


def wait_until_ok(url: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Poll a health URL until it answers 200 (bounded; a readiness check, not a sleep)."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = requests.get(url, timeout=5)
            if response.status_code == 200:
                return
            last = response.status_code
        except requests.RequestException as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s}s: {last}")


@pytest.fixture(scope="session")
def artifact_dir() -> Path:
    path = REPO_ROOT / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip_checkpoint(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("collection")
    write_image_folder(folder, COLLECTION_SIZE)
    (folder / "notes.jpg").write_text("this is not an image")
    return folder


@pytest.fixture(scope="session")
def index_dir(tmp_path_factory: pytest.TempPathFactory, image_folder: Path, tiny_model_dir: Path) -> Path:
    from index_builder.cli import main

    out = tmp_path_factory.mktemp("index")
    code = main(["--images", str(image_folder), "--out", str(out), "--model", str(tiny_model_dir), "--quiet"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def manifest(index_dir: Path) -> dict:
    """The published version as one manifest-shaped dict (its live records, model fields, next_id)."""
    from image_search.artifact import load_artifact
    from image_search.storage import LocalStore

    return json.loads(load_artifact(LocalStore(index_dir)).manifest.to_json())


@pytest.fixture(scope="session")
def indexed_images(image_folder: Path, manifest: dict) -> list[Path]:
    return [image_folder / record["key"] for record in manifest["records"]]


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    # More logical CPUs than cores: the deployments' fractional CPU asks must all schedule.
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_cluster: None) -> Iterator[int]:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


@pytest.fixture(scope="session")
def app_args(index_dir: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AppArgs:
    from serve_app.config import AppArgs

    return AppArgs.model_validate(
        {
            "model": str(tiny_model_dir),
            "index": str(index_dir),
            # This session's own thumbnail cache: tests count on what is (not) cached in it.
            "thumbnail_cache_dir": str(tmp_path_factory.mktemp("thumbnails")),
            "embedder": {"num_threads": 1},
            "limits": {"max_files": 8, "max_file_bytes": 2_000_000, "max_request_bytes": 6_000_000},
            "request_timeout_s": REQUEST_TIMEOUT_S,
        }
    )


@pytest.fixture(scope="session")
def serve_base_url(serve_port: int, app_args: AppArgs) -> str:
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app(app_args), name=APP_NAME, route_prefix="/", blocking=False)
    base_url = f"http://127.0.0.1:{serve_port}"
    wait_until_ok(f"{base_url}/healthz")
    return base_url
