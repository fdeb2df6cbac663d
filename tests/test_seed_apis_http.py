"""The seed's two inner APIs over HTTP: POST /embed (Embedding API) and POST /search/vectors (Search API)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import REQUEST_TIMEOUT_S
from tests.support import post_search


def embed(base_url: str, files: list[Path] = (), texts: list[str] = ()) -> requests.Response:  # type: ignore[assignment]
    parts = [("files", (path.name, path.read_bytes(), "application/octet-stream")) for path in files]
    data = [("text", text) for text in texts]
    if not parts:
        return requests.post(f"{base_url}/embed", data=data, timeout=REQUEST_TIMEOUT_S)
    return requests.post(f"{base_url}/embed", files=parts, data=data, timeout=REQUEST_TIMEOUT_S)


def search_vectors(base_url: str, body: object) -> requests.Response:
    return requests.post(f"{base_url}/search/vectors", json=body, timeout=REQUEST_TIMEOUT_S)


def dim_of(base_url: str) -> int:
    return int(requests.get(f"{base_url}/info", timeout=REQUEST_TIMEOUT_S).json()["embedding_dim"])


def test_embed_answers_unit_vectors_in_request_order(serve_base_url: str, indexed_images: list[Path]) -> None:
    response = embed(serve_base_url, [indexed_images[0], indexed_images[1]], ["a red circle"])
    assert response.status_code == 200
    body = response.json()
    assert body["dim"] == dim_of(serve_base_url)
    assert body["model"] and body["precision"]
    assert [e.get("filename") or e.get("text") for e in body["embeddings"]] == [
        indexed_images[0].name,
        indexed_images[1].name,
        "a red circle",
    ]
    for entry in body["embeddings"]:
        vector = np.asarray(entry["vector"])
        assert vector.shape == (body["dim"],)
        assert abs(np.linalg.norm(vector) - 1.0) < 1e-4


def test_an_embedded_photo_is_the_vector_the_builder_stored(serve_base_url: str, indexed_images: list[Path]) -> None:
    # Searching with the embedding finds the photo itself at cosine >= 0.9999: the stored vector.
    for path in indexed_images[:4]:
        (entry,) = embed(serve_base_url, [path]).json()["embeddings"]
        response = search_vectors(serve_base_url, {"vectors": [entry["vector"]], "k": 1})
        (match,) = response.json()["results"][0]["matches"]
        assert match["path"] == path.name
        assert match["score"] >= 0.9999


def test_vector_search_equals_image_search(serve_base_url: str, indexed_images: list[Path]) -> None:
    path = indexed_images[5]
    (entry,) = embed(serve_base_url, [path]).json()["embeddings"]
    by_vector = search_vectors(serve_base_url, {"vectors": [entry["vector"]], "k": 6}).json()
    by_image = post_search(serve_base_url, [(path.name, path.read_bytes())], params={"k": 6}).json()
    got = by_vector["results"][0]["matches"]
    want = by_image["results"][0]["matches"]
    assert [m["id"] for m in got] == [m["id"] for m in want]
    assert np.allclose([m["score"] for m in got], [m["score"] for m in want], atol=1e-5)
    assert by_vector["results"][0]["vector"] == 0
    assert by_vector["index_version"] == by_image["index_version"]


def test_vector_search_normalises_and_answers_one_entry_per_vector(serve_base_url: str) -> None:
    dim = dim_of(serve_base_url)
    rng = np.random.default_rng(3)
    raw = rng.standard_normal((3, dim))
    body = search_vectors(serve_base_url, {"vectors": (raw * 50).tolist(), "k": 2}).json()
    unit = search_vectors(serve_base_url, {"vectors": (raw / np.linalg.norm(raw, axis=1, keepdims=True)).tolist()})
    assert [entry["vector"] for entry in body["results"]] == [0, 1, 2]
    assert all(len(entry["matches"]) == 2 for entry in body["results"])
    # Same direction, same answer: the scale of a vector does not matter.
    assert [m["id"] for m in body["results"][1]["matches"]] == [
        m["id"] for m in unit.json()["results"][1]["matches"][:2]
    ]


def test_embed_reports_a_bad_file_in_its_entry_and_answers_the_rest(
    serve_base_url: str, indexed_images: list[Path], tmp_path: Path
) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    body = embed(serve_base_url, [bad, indexed_images[0]]).json()
    assert body["embeddings"][0]["error"]["code"] in {"not_an_image", "corrupt_image", "unsupported_format"}
    assert "vector" in body["embeddings"][1]


def test_embed_with_only_bad_queries_is_the_first_ones_4xx(serve_base_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "empty.jpg"
    bad.write_bytes(b"")
    response = embed(serve_base_url, [bad])
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "empty_file"
    assert response.json()["embeddings"][0]["error"]["code"] == "empty_file"


def test_vector_search_takes_max_queries_vectors_and_refuses_one_more(serve_base_url: str) -> None:
    info = requests.get(f"{serve_base_url}/info", timeout=REQUEST_TIMEOUT_S).json()
    dim, most = int(info["embedding_dim"]), int(info["max_queries"])
    vectors = np.eye(1, dim).repeat(most + 1, axis=0).tolist()
    assert search_vectors(serve_base_url, {"vectors": vectors[:most], "k": 1}).status_code == 200
    response = search_vectors(serve_base_url, {"vectors": vectors, "k": 1})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_many_queries"


BAD_BODIES = {
    "wrong dimension": ({"vectors": [[1.0, 0.0]]}, 422, "invalid_vectors"),
    "zero vector": ({"vectors": ["ZERO"]}, 422, "invalid_vectors"),
    "not a number": ({"vectors": ["TEXT"]}, 422, "invalid_vectors"),
    "a boolean": ({"vectors": ["BOOL"]}, 422, "invalid_vectors"),
    "no vectors": ({"vectors": []}, 422, "invalid_vectors"),
    "vectors not a list": ({"vectors": "1,2,3"}, 400, "invalid_json"),
    "not an object": ([[1.0]], 400, "invalid_json"),
    "unknown field": ({"vectors": ["ONE"], "kk": 3}, 400, "invalid_json"),
    "k zero": ({"vectors": ["ONE"], "k": 0}, 422, "invalid_k"),
    "k a string": ({"vectors": ["ONE"], "k": "5"}, 422, "invalid_k"),
    "k over max": ({"vectors": ["ONE"], "k": 100_000}, 422, "invalid_k"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_vector_bodies_are_4xx_with_the_error_shape(serve_base_url: str, case: str) -> None:
    dim = dim_of(serve_base_url)
    body, status, code = BAD_BODIES[case]
    fill = {"ZERO": [0.0] * dim, "TEXT": ["x"] * dim, "BOOL": [True] * dim, "ONE": [1.0] + [0.0] * (dim - 1)}
    if isinstance(body, dict) and isinstance(body.get("vectors"), list):
        body = {**body, "vectors": [fill.get(v, v) if isinstance(v, str) else v for v in body["vectors"]]}
    response = search_vectors(serve_base_url, body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_non_finite_values_and_bodies_that_are_not_json_are_4xx(serve_base_url: str) -> None:
    dim = dim_of(serve_base_url)
    nan_body = json.dumps({"vectors": [[float("nan")] + [0.0] * (dim - 1)]})  # json writes NaN, which parses
    for data, status, code in [
        (nan_body, 422, "invalid_vectors"),
        ("{not json", 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_json"),
    ]:
        response = requests.post(f"{serve_base_url}/search/vectors", data=data, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == status
        assert response.json()["error"]["code"] == code


def test_a_vector_body_over_its_limit_is_413(serve_base_url: str) -> None:
    from serve_app.queries.vectors import vector_body_limit

    info = requests.get(f"{serve_base_url}/info", timeout=REQUEST_TIMEOUT_S).json()
    limit = vector_body_limit(int(info["max_queries"]), int(info["embedding_dim"]))
    at_limit = requests.post(f"{serve_base_url}/search/vectors", data=b" " * limit, timeout=REQUEST_TIMEOUT_S)
    assert at_limit.status_code == 400  # read whole, then refused for what it is
    response = requests.post(f"{serve_base_url}/search/vectors", data=b" " * (limit + 1), timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
