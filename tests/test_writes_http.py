"""POST /images and DELETE /images/{id} over real HTTP, on an app of their own with writes on.

The app gets its own copy of the collection and index (writes change them); the session's shared app
has no write token, so it shows writes switched off.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.living import build, info, search, served_app
from tests.support import synthetic_image

APP = "writes"
TOKEN = "test-write-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT = 60
COLLECTION_DISK_BYTES = 16 * 1024 * 1024


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    synthetic_image(seed).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def writes_app(
    tmp_path_factory: pytest.TempPathFactory, image_folder: Path, tiny_model_dir: Path, serve_port: int
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("writes-app")
    images, index = root / "images", root / "index"
    # The collection lives on a small tmpfs of its own, so a test can fill it up (a real ENOSPC).
    images.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={COLLECTION_DISK_BYTES}", "tmpfs", str(images)], check=True)
    shutil.copytree(image_folder, images, dirs_exist_ok=True)
    build(images, index, tiny_model_dir)
    (root / "token").write_text(TOKEN + "\n")
    args = {
        "model": str(tiny_model_dir),
        "index": str(index),
        "embedder": {"num_threads": 1},
        "limits": {"max_files": 8, "max_file_bytes": 2_000_000, "max_request_bytes": 6_000_000},
        "request_timeout_s": 30,
        "reload_interval_s": 0.5,
        "writes": {"token_file": str(root / "token"), "lock_wait_s": 5},
    }
    options = {"Writer": {"ray_actor_options": {"num_cpus": 0.1}}, "Ingress": {"ray_actor_options": {"num_cpus": 0.1}}}
    try:
        with served_app(APP, serve_port, args, options) as base_url:
            yield {"url": base_url, "images": images, "index": index}
    finally:
        subprocess.run(["umount", "--lazy", str(images)], check=False)


def add(base_url: str, files: list[tuple[str, bytes]], keys: list[str] = (), **params: str) -> requests.Response:  # type: ignore[assignment]
    parts: list[tuple[str, Any]] = [("files", (name, data, "image/jpeg")) for name, data in files]
    parts += [("key", (None, key)) for key in keys]
    return requests.post(f"{base_url}/images", files=parts, params=params, headers=AUTH, timeout=TIMEOUT)


def delete(base_url: str, image_id: int | str, **params: str) -> requests.Response:
    return requests.delete(f"{base_url}/images/{image_id}", params=params, headers=AUTH, timeout=TIMEOUT)


def top_id(base_url: str, data: bytes) -> int | None:
    response = search(base_url, data, k=1)
    assert response.status_code == 200, response.text
    matches = response.json()["results"][0]["matches"]
    return matches[0]["id"] if matches else None


def found_ids(base_url: str, data: bytes) -> list[int]:
    response = search(base_url, data, k=100)
    assert response.status_code == 200, response.text
    return [match["id"] for match in response.json()["results"][0]["matches"]]


# --- writes off, auth ---------------------------------------------------------------------------------------


def test_a_service_without_a_write_token_has_writes_off(serve_base_url: str) -> None:
    answer = requests.post(f"{serve_base_url}/images", files=[("files", ("a.jpg", jpeg(1)))], headers=AUTH, timeout=30)
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "writes_disabled"
    answer = requests.delete(f"{serve_base_url}/images/0", headers=AUTH, timeout=30)
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "writes_disabled"
    assert info(serve_base_url)["writes"] is False


@pytest.mark.parametrize("header", [None, "Bearer wrong-token-0123456789abcdef", TOKEN, "Basic dGVzdA=="])
def test_a_missing_or_wrong_token_is_401_with_www_authenticate(writes_app: dict[str, Any], header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    for answer in (
        requests.post(
            f"{writes_app['url']}/images", files=[("files", ("a.jpg", jpeg(2)))], headers=headers, timeout=30
        ),
        requests.delete(f"{writes_app['url']}/images/0", headers=headers, timeout=30),
    ):
        assert answer.status_code == 401, answer.text
        assert answer.headers["WWW-Authenticate"] == "Bearer"
        assert answer.json()["error"]["code"] == "unauthorized" and TOKEN not in answer.text
    assert top_id(writes_app["url"], jpeg(2)) is not None  # reads stay open
    assert info(writes_app["url"])["writes"] is True


# --- adding, replacing, deleting ----------------------------------------------------------------------------


def test_an_added_image_is_found_by_the_next_search_and_a_reupload_is_unchanged(writes_app: dict[str, Any]) -> None:
    url, data = writes_app["url"], jpeg(101)
    before = info(url)["index_size"]
    answer = add(url, [("photo.jpg", data)])
    assert answer.status_code == 201, answer.text
    body = answer.json()
    (entry,) = body["results"]
    sha = hashlib.sha256(data).hexdigest()
    assert entry == {"filename": "photo.jpg", "key": f"uploads/{sha[:32]}.jpg", "id": entry["id"], "status": "added"}
    assert (writes_app["images"] / entry["key"]).read_bytes() == data
    # Read-your-writes: this Ingress serves the version holding it already (no waiting for the poll).
    assert info(url)["index_version"] >= body["index_version"] and info(url)["index_size"] == before + 1
    assert top_id(url, data) == entry["id"]

    again = add(url, [("other-name.jpg", data)])
    assert again.status_code == 201
    assert again.json()["results"][0] | {"filename": "photo.jpg"} == entry | {"status": "unchanged"}
    assert found_ids(url, data).count(entry["id"]) == 1 and info(url)["index_size"] == before + 1


def test_replacing_the_bytes_of_a_key_keeps_its_id(writes_app: dict[str, Any]) -> None:
    url, first, second = writes_app["url"], jpeg(201), jpeg(202)
    added = add(url, [("p.jpg", first)], keys=["products/123.jpg"]).json()["results"][0]
    assert added["status"] == "added" and added["key"] == "products/123.jpg"
    replaced = add(url, [("p.jpg", second)], keys=["products/123.jpg"])
    assert replaced.status_code == 201
    assert replaced.json()["results"][0] == {**added, "status": "replaced"}
    assert top_id(url, second) == added["id"]
    image = requests.get(f"{url}/images/{added['id']}", timeout=30)
    assert image.status_code == 200 and image.content == second
    assert (writes_app["images"] / "products/123.jpg").read_bytes() == second


def test_a_deleted_image_is_gone_from_search_the_store_and_images(writes_app: dict[str, Any]) -> None:
    url, data = writes_app["url"], jpeg(301)
    entry = add(url, [("d.jpg", data)], keys=["to-delete/d.jpg"]).json()["results"][0]
    answer = delete(url, entry["id"])
    assert answer.status_code == 200, answer.text
    assert answer.json() | {"index_version": "-"} == {
        "index_version": "-",
        "id": entry["id"],
        "key": "to-delete/d.jpg",
        "status": "deleted",
    }
    assert entry["id"] not in found_ids(url, data)
    assert requests.get(f"{url}/images/{entry['id']}", timeout=30).status_code == 404
    assert not (writes_app["images"] / "to-delete/d.jpg").exists()
    again = delete(url, entry["id"])
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"
    assert delete(url, 987654).status_code == 404
    # The same bytes again are a new image with a new id (ids are never reused).
    readded = add(url, [("d.jpg", data)], keys=["to-delete/d.jpg"]).json()["results"][0]
    assert readded["status"] == "added" and readded["id"] > entry["id"]


def test_wait_stored_answers_202_with_the_version_that_holds_the_change(writes_app: dict[str, Any]) -> None:
    url, data = writes_app["url"], jpeg(401)
    answer = add(url, [("s.jpg", data)], wait="stored")
    assert answer.status_code == 202, answer.text
    version, entry = answer.json()["index_version"], answer.json()["results"][0]
    assert (writes_app["index"] / "versions" / version / "version.json").exists()
    gone = delete(url, entry["id"], wait="stored")
    assert gone.status_code == 202 and gone.json()["index_version"] > version


def test_per_file_problems_are_that_files_error_entry_as_in_search(writes_app: dict[str, Any]) -> None:
    url = writes_app["url"]
    answer = add(
        url, [("good.jpg", jpeg(501)), ("bad.jpg", b"not an image"), ("k.jpg", jpeg(502))], keys=["", "", "../x.jpg"]
    )
    assert answer.status_code == 201, answer.text
    good, bad, badkey = answer.json()["results"]
    assert good["status"] == "added" and good["filename"] == "good.jpg"
    assert bad == {"filename": "bad.jpg", "error": bad["error"]} and bad["error"]["code"] == "not_an_image"
    assert badkey["error"]["code"] == "invalid_key" and "id" not in badkey
    assert top_id(url, jpeg(501)) == good["id"]
    # A decodable file with a bad key before a good one: the good one gets its own vector.
    first_bad = add(url, [("k.jpg", jpeg(503)), ("fine.jpg", jpeg(504))], keys=["../x.jpg", "fine/504.jpg"])
    badkey, fine = first_bad.json()["results"]
    assert badkey["error"]["code"] == "invalid_key" and fine["status"] == "added"
    assert top_id(url, jpeg(504)) == fine["id"]
    everything_bad = add(url, [("bad.jpg", b"not an image"), ("empty.jpg", b"")])
    assert everything_bad.status_code == 400
    assert [r["error"]["code"] for r in everything_bad.json()["results"]] == ["not_an_image", "empty_file"]
    too_big = add(url, [("big.jpg", b"\xff" * 2_100_000)])
    assert too_big.status_code == 413 and too_big.json()["results"][0]["error"]["code"] == "file_too_large"


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code"),
    [
        ({"params": {"wait": "never"}}, 422, "invalid_wait"),
        ({"keys": ["a.jpg", "b.jpg"]}, 422, "invalid_key"),  # two keys for one file
        ({"keys": ["notes.txt"]}, 422, "invalid_key"),
        ({"no_files": True}, 400, "no_files"),
        ({"not_multipart": True}, 415, "not_multipart"),
    ],
)
def test_malformed_write_requests_are_clear_4xx(
    writes_app: dict[str, Any], request_kwargs: dict[str, Any], status: int, code: str
) -> None:
    url = f"{writes_app['url']}/images"
    if request_kwargs.get("not_multipart"):
        answer = requests.post(url, data=b"x", headers={**AUTH, "Content-Type": "image/jpeg"}, timeout=30)
    elif request_kwargs.get("no_files"):
        answer = requests.post(url, files=[("key", (None, "a.jpg"))], headers=AUTH, timeout=30)
    else:
        answer = add(
            writes_app["url"],
            [("a.jpg", jpeg(601))],
            keys=request_kwargs.get("keys", []),
            **request_kwargs.get("params", {}),
        )
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code
    assert delete(writes_app["url"], 1, wait="later").json()["error"]["code"] == "invalid_wait"


def test_writes_from_many_clients_at_once_are_grouped_into_few_commits(writes_app: dict[str, Any]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    url = writes_app["url"]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: add(url, [(f"{i}.jpg", jpeg(700 + i))], wait="stored"), range(16)))
    assert all(answer.status_code == 202 for answer in answers), [a.text for a in answers]
    ids = [answer.json()["results"][0]["id"] for answer in answers]
    assert len(set(ids)) == 16
    versions = {answer.json()["index_version"] for answer in answers}
    assert len(versions) < 16  # writes that arrived together shared a commit


def test_a_full_disk_answers_507_and_loses_nothing_acknowledged(writes_app: dict[str, Any]) -> None:
    url, images = writes_app["url"], writes_app["images"]
    kept = add(url, [("kept.jpg", jpeg(801))]).json()["results"][0]
    filler = images / "filler.bin"  # not an image: the builder and the writes ignore it
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 4096, 1):  # unbuffered, so the last write is the one that fails
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    try:
        data = jpeg(802)
        answer = add(url, [("lost.jpg", data)])
        assert answer.status_code == 507, answer.text
        assert answer.json()["error"]["code"] == "store_full" and "space" in answer.json()["error"]["message"]
        kept_matches = search(url, jpeg(801), k=3).json()
        assert kept_matches["results"][0]["matches"][0]["id"] == kept["id"], (kept, kept_matches)  # still served
        assert not list(images.glob("uploads/.*.tmp"))  # the failed write left no partial file
    finally:
        os.unlink(filler)
    again = add(url, [("lost.jpg", data)])
    assert again.status_code == 201 and again.json()["results"][0]["status"] == "added"
    assert top_id(url, data) == again.json()["results"][0]["id"]


def test_the_image_search_command_adds_and_deletes_through_the_routes(
    writes_app: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from image_search_client.cli import main

    url = writes_app["url"]
    (tmp_path / "cli.jpg").write_bytes(jpeg(901))
    monkeypatch.setenv("IMAGE_SEARCH_WRITE_TOKEN", TOKEN)
    out = io.StringIO()
    assert main(["--url", url, "add", str(tmp_path / "cli.jpg"), "--json"], out=out) == 0
    (entry,) = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
    assert entry["status"] == "added" and top_id(url, jpeg(901)) == entry["id"]
    assert main(["--url", url, "delete", str(entry["id"])], out=io.StringIO()) == 0
    assert entry["id"] not in found_ids(url, jpeg(901))
    monkeypatch.setenv("IMAGE_SEARCH_WRITE_TOKEN", "wrong-token-0123456789abcdef")
    assert main(["--url", url, "add", str(tmp_path / "cli.jpg")], out=io.StringIO()) == 1
