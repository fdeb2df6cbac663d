"""The search service end to end, over real HTTP against the real Serve application."""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from serve_app.config import AppArgs
from tests.support import post_search, synthetic_image


def post_files(base_url: str, files: list[tuple[str, bytes]], k: int | None = None) -> requests.Response:
    return post_search(base_url, files, {"k": k} if k is not None else None)


def test_every_indexed_image_finds_itself_first(
    serve_base_url: str, indexed_images: list[Path], image_folder: Path
) -> None:
    for expected_id, path in enumerate(indexed_images):
        response = post_files(serve_base_url, [(path.name, path.read_bytes())])
        assert response.status_code == 200, response.text
        (result,) = response.json()["results"]
        top = result["matches"][0]
        assert top["id"] == expected_id, (path, result["matches"][:2])
        assert top["score"] >= 0.99
        assert image_folder / top["path"] == path


def test_multi_file_request_answers_each_file_in_order(serve_base_url: str, indexed_images: list[Path]) -> None:
    chosen = [indexed_images[3], indexed_images[0], indexed_images[7]]
    response = post_files(serve_base_url, [(p.name, p.read_bytes()) for p in chosen], k=3)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [p.name for p in chosen]
    assert [r["matches"][0]["id"] for r in results] == [3, 0, 7]
    assert all(len(r["matches"]) == 3 for r in results)
    scores = [m["score"] for m in results[0]["matches"]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("k", [1, 5, 24])
def test_k_is_honoured(serve_base_url: str, indexed_images: list[Path], k: int) -> None:
    path = indexed_images[1]
    response = post_files(serve_base_url, [(path.name, path.read_bytes())], k=k)
    assert response.status_code == 200
    assert len(response.json()["results"][0]["matches"]) == k


def test_k_defaults_to_five(serve_base_url: str, indexed_images: list[Path]) -> None:
    path = indexed_images[2]
    response = post_files(serve_base_url, [(path.name, path.read_bytes())])
    assert len(response.json()["results"][0]["matches"]) == 5


def test_k_larger_than_collection_returns_whole_collection(serve_base_url: str, indexed_images: list[Path]) -> None:
    path = indexed_images[2]
    response = post_files(serve_base_url, [(path.name, path.read_bytes())], k=100)
    assert response.status_code == 200
    ids = [m["id"] for m in response.json()["results"][0]["matches"]]
    assert sorted(ids) == list(range(len(indexed_images)))


def test_image_route_returns_the_indexed_bytes(serve_base_url: str, indexed_images: list[Path]) -> None:
    for image_id in (0, 5, len(indexed_images) - 1):
        response = requests.get(f"{serve_base_url}/images/{image_id}", timeout=30)
        assert response.status_code == 200
        assert response.content == indexed_images[image_id].read_bytes()
        assert response.headers["content-type"].startswith("image/")


def test_thumbnail_is_small_jpeg_that_caches_revalidate_by_etag(serve_base_url: str) -> None:
    response = requests.get(f"{serve_base_url}/images/0?size=128", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["cache-control"] == "no-cache"  # revalidated: a cached copy never outlives its id
    image = Image.open(io.BytesIO(response.content))
    assert max(image.size) == 128
    again = requests.get(
        f"{serve_base_url}/images/0?size=128", headers={"If-None-Match": response.headers["etag"]}, timeout=30
    )
    assert again.status_code == 304


@pytest.mark.parametrize("image_id", ["24", "99999", "-1", "abc", "..%2F..%2Fetc%2Fpasswd", "0x1"])
def test_unknown_image_ids_are_404(serve_base_url: str, image_id: str) -> None:
    response = requests.get(f"{serve_base_url}/images/{image_id}", timeout=30)
    assert response.status_code == 404
    assert "error" in response.json()


def test_info_reports_model_dim_and_count(serve_base_url: str, manifest: dict, tiny_model_dir: Path) -> None:
    info = requests.get(f"{serve_base_url}/info", timeout=30).json()
    assert info["model"] == tiny_model_dir.name  # a name, never the server's path
    assert str(tiny_model_dir.parent) not in requests.get(f"{serve_base_url}/info", timeout=30).text
    assert info["demo_data"] is False
    assert info["embedding_dim"] == 32
    assert info["index_size"] == len(manifest["records"]) == 24
    assert info["index_version"]
    assert info["index_type"] == "Flat"


def test_healthz_reports_each_deployments_replicas_and_the_version(serve_base_url: str, index_dir: Path) -> None:
    response = requests.get(f"{serve_base_url}/healthz", timeout=30)
    body = response.json()
    assert (response.status_code, body["status"]) == (200, "ok"), body
    assert body["index_version"] == (index_dir / "CURRENT").read_text().strip()
    assert set(body["deployments"]) == {"Embedder", "Searcher", "Ingress"}
    assert body["deployments"]["Searcher"] == {"status": "HEALTHY", "healthy_replicas": 2, "replicas": 2}


def test_search_answer_names_its_index_version(
    serve_base_url: str, indexed_images: list[Path], index_dir: Path
) -> None:
    path = indexed_images[0]
    response = post_files(serve_base_url, [(path.name, path.read_bytes())])
    assert response.json()["index_version"] == (index_dir / "CURRENT").read_text().strip()
    assert response.json()["demo"] is False  # a trained (not the random demo) model: scores mean something


def test_unseen_photo_gets_ranked_matches(serve_base_url: str) -> None:
    out = io.BytesIO()
    synthetic_image(10_000, (640, 480)).save(out, format="JPEG")
    response = post_files(serve_base_url, [("new.jpg", out.getvalue())])
    matches = response.json()["results"][0]["matches"]
    assert len(matches) == 5
    assert all(-1.0 <= m["score"] <= 1.0 for m in matches)
    assert [m["score"] for m in matches] == sorted((m["score"] for m in matches), reverse=True)


def test_concurrent_requests_join_one_forward_pass(
    serve_base_url: str, app_args: AppArgs, indexed_images: list[Path]
) -> None:
    """Gate the Embedder: with a 10 s wait for company, only a full batch of the 4 requests can run.

    A deploy from code replaces the replicas (each gets a new code version), so batches are counted on
    the gated replica itself; the default batching is deployed again after.
    """
    from ray import serve

    from serve_app.app import build_graph
    from tests.conftest import APP_NAME

    def deploy(batching: dict) -> None:
        app = build_graph(app_args, {"Embedder": {"user_config": batching}})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)

    embedder = serve.get_deployment_handle("Embedder", app_name=APP_NAME)
    deploy({"max_batch_size": 4, "batch_wait_timeout_s": 10})
    try:
        before = embedder.batch_size_counts.remote().result()
        payloads = [(p.name, p.read_bytes()) for p in indexed_images[:4]]
        with ThreadPoolExecutor(max_workers=4) as pool:
            responses = list(pool.map(lambda item: post_files(serve_base_url, [item]), payloads))
        assert [r.status_code for r in responses] == [200] * 4
        assert [r.json()["results"][0]["matches"][0]["id"] for r in responses] == [0, 1, 2, 3]
        after = embedder.batch_size_counts.remote().result()
    finally:
        deploy({})
    new_batches = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert {size: n for size, n in new_batches.items() if n} == {4: 1}


@pytest.mark.parametrize("size", ["64", "0", "abc", "100000"])
def test_thumbnail_sizes_outside_the_list_are_422(serve_base_url: str, size: str) -> None:
    response = requests.get(f"{serve_base_url}/images/0", params={"size": size}, timeout=30)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_size"


def test_an_indexed_image_that_no_longer_reads_is_a_server_fault_and_one_that_changed_is_409(
    serve_base_url: str, indexed_images: list[Path]
) -> None:
    """Our own data's problem, never a 4xx as if the client had sent it: a file gone is 500
    `indexed_image_unreadable`; other bytes under the key are 409 `indexed_image_changed` (never served)."""
    image_id = len(indexed_images) - 1  # size 512 of the last image: no other test has it in the cache
    path = indexed_images[image_id]
    original = path.read_bytes()
    try:
        path.write_bytes(b"no longer an image")
        changed = [
            requests.get(f"{serve_base_url}/images/{image_id}", params={"size": 512}, timeout=30),
            requests.get(f"{serve_base_url}/images/{image_id}", timeout=30),
        ]
        path.unlink()
        gone = requests.get(f"{serve_base_url}/images/{image_id}", timeout=30)
    finally:
        path.write_bytes(original)
    for response in changed:
        assert response.status_code == 409, response.text
        assert response.json()["error"]["code"] == "indexed_image_changed"
        assert b"no longer an image" not in response.content
    assert gone.status_code == 500, gone.text
    assert gone.json()["error"]["code"] == "indexed_image_unreadable"
    for response in [*changed, gone]:
        assert str(path.parent) not in response.text


def test_a_link_to_a_secret_outside_the_collection_under_an_indexed_name_is_never_served(
    serve_base_url: str, indexed_images: list[Path], tmp_path: Path
) -> None:
    image_id = 7  # no other test asks for this id's bytes or its 256 thumbnail
    path = indexed_images[image_id]
    original = path.read_bytes()
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOP-SECRET" + b"!" * (len(original) - 10))  # the same size as the record
    try:
        path.unlink()
        path.symlink_to(secret)
        responses = [
            requests.get(f"{serve_base_url}/images/{image_id}", timeout=30),
            requests.get(f"{serve_base_url}/images/{image_id}", params={"size": 256}, timeout=30),
        ]
    finally:
        path.unlink()
        path.write_bytes(original)
    for response in responses:
        assert response.status_code == 409, response.text
        assert response.json()["error"]["code"] == "indexed_image_changed"
        assert b"TOP-SECRET" not in response.content and str(tmp_path) not in response.text
    again = requests.get(f"{serve_base_url}/images/{image_id}", timeout=30)
    assert (again.status_code, again.content) == (200, original)


def test_a_full_image_keeps_its_etag_and_304_and_says_its_length(
    serve_base_url: str, indexed_images: list[Path]
) -> None:
    response = requests.get(f"{serve_base_url}/images/3", timeout=30)
    assert response.status_code == 200 and response.content == indexed_images[3].read_bytes()
    assert response.headers["content-length"] == str(len(response.content))
    again = requests.get(f"{serve_base_url}/images/3", headers={"If-None-Match": response.headers["etag"]}, timeout=30)
    assert again.status_code == 304 and not again.content


def test_the_page_and_its_script_use_relative_urls_so_a_root_path_works(serve_base_url: str) -> None:
    """The API honours root_path; absolute URLs on the page ("/info", "/ui/app.js") would leave it."""
    page = requests.get(f"{serve_base_url}/", timeout=30).text
    script = requests.get(f"{serve_base_url}/ui/app.js", timeout=30).text
    assert 'src="ui/app.js"' in page and 'href="ui/style.css"' in page
    assert not re.search(r'(src|href)="/(?!/)', page)
    assert 'fetch("info"' in script
    assert not re.search(r"""(fetch\(|postForm\()\s*[`"']/""", script)


def test_one_search_adds_one_to_every_stage_of_each_replica_it_passes(
    serve_base_url: str, indexed_images: list[Path]
) -> None:
    """The stage times benchmarks/served.py reads: one POST /search counts once in every stage it ran."""
    from ray import serve

    from serve_app.stage_times import merge
    from tests.conftest import APP_NAME

    ingress = serve.get_deployment_handle("Ingress", app_name=APP_NAME)
    embedder = serve.get_deployment_handle("Embedder", app_name=APP_NAME)
    searcher = serve.get_deployment_handle("Searcher", app_name=APP_NAME)
    replicas = serve.status().applications[APP_NAME].deployments["Searcher"].replica_states.get("RUNNING", 0)

    def searcher_snapshots() -> dict[int, dict[str, tuple[float, int]]]:
        """Every Searcher replica's totals: asked until each has answered (routing picks one per call)."""
        seen: dict[int, dict[str, tuple[float, int]]] = {}
        for _ in range(200):
            pid, snapshot = searcher.stage_times.remote().result()
            seen[pid] = snapshot
            if len(seen) == replicas:
                return seen
        raise AssertionError(f"only {len(seen)} of {replicas} Searcher replicas answered")

    def counts(snapshot: dict[str, tuple[float, int]]) -> dict[str, int]:
        return {stage: count for stage, (_, count) in snapshot.items()}

    ingress_before, embedder_before = ingress.stage_times.remote().result(), embedder.stage_times.remote().result()
    searchers_before = searcher_snapshots()
    response = post_files(serve_base_url, [(indexed_images[0].name, indexed_images[0].read_bytes())])
    assert response.status_code == 200
    ingress_after, embedder_after = ingress.stage_times.remote().result(), embedder.stage_times.remote().result()
    searchers_after = searcher_snapshots()

    def added(before: dict[str, tuple[float, int]], after: dict[str, tuple[float, int]]) -> dict[str, int]:
        return {stage: count - counts(before).get(stage, 0) for stage, count in counts(after).items()}

    ingress_stages = ("read form", "decode + crop", "Embedder calls", "vectors stacked", "Searcher call")
    assert added(ingress_before, ingress_after) == dict.fromkeys((*ingress_stages, "results + JSON", "handler"), 1)
    embedder_stages = ("in replica", "queue", "stack", "to model thread", "forward", "from model thread")
    assert added(embedder_before, embedder_after) == dict.fromkeys(embedder_stages, 1)
    assert set(searchers_after) == set(searchers_before)  # the same replicas, none restarted
    searched = added(merge(list(searchers_before.values())), merge(list(searchers_after.values())))
    assert searched == {"in replica": 1, "search (on its thread)": 1}
    # Nested stages fit inside the ones around them.
    embed_call = ingress_after["Embedder calls"][0] - ingress_before.get("Embedder calls", (0.0, 0))[0]
    in_embedder = embedder_after["in replica"][0] - embedder_before.get("in replica", (0.0, 0))[0]
    assert 0 < in_embedder <= embed_call
