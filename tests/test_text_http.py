"""Text and combined queries end to end, over real HTTP against the real Serve application.

Expected answers are computed beside the service with the library's own encoders and the index's
own vectors (brute force), so the tests check the served numbers, not just their shape. A second
application, deployed from the same weights without a tokenizer, shows text search switched off.
Limits of the test application come from tests/conftest.py (defaults for the text limits).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote_from_bytes

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from image_search.encoder import ClipImageEncoder
from image_search.preprocessing import pixels_from_bytes
from image_search.text_encoder import ClipTextEncoder
from serve_app.combined import weighted_sum
from serve_app.config import UploadLimits
from tests.conftest import wait_until_ok
from tests.support import make_clip_checkpoint

LIMITS = UploadLimits()  # the app under test keeps the default text limits
LONG_TEXT = " ".join(["a red bicycle by the canal at night"] * 20)
NO_TEXT_APP = "image_search_no_text"
NO_TEXT_PREFIX = "/notext"


def post(base_url: str, route: str = "/search", files=(), texts=(), params=None, data=None) -> requests.Response:
    parts = [("files", (name, content, "application/octet-stream")) for name, content in files]
    parts += [("text", (None, text)) for text in texts]
    for name, values in (data or {}).items():
        parts += [(name, (None, value)) for value in values]
    return requests.post(f"{base_url}{route}", files=parts, params=params, timeout=60)


def assert_error(response: requests.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    return error


# ---------------------------------------------------------------- the expected answers, computed here


@pytest.fixture(scope="module")
def index_vectors(index_dir: Path) -> np.ndarray:
    from image_search.artifact import load_artifact
    from image_search.storage import LocalStore

    # CURRENT's live vectors in one exact index under their ids (0..n-1 in the session's index).
    index = load_artifact(LocalStore(index_dir)).index
    return index.reconstruct_n(0, index.ntotal)


@pytest.fixture(scope="module")
def text_encoder(tiny_model_dir: Path) -> ClipTextEncoder:
    # The precision the Embedder runs (its default `auto`, resolved on this CPU as for the image tower).
    return ClipTextEncoder(str(tiny_model_dir), device="cpu", precision="auto")


@pytest.fixture(scope="module")
def image_encoder(tiny_model_dir: Path) -> ClipImageEncoder:
    return ClipImageEncoder(str(tiny_model_dir), device="cpu")


def expected_top(query: np.ndarray, index_vectors: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    scores = index_vectors @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return order.tolist(), scores[order].tolist()


def assert_matches(entry: dict, ids: list[int], scores: list[float]) -> None:
    served_scores = [match["score"] for match in entry["matches"]]
    assert served_scores == sorted(served_scores, reverse=True)
    np.testing.assert_allclose(served_scores, scores, atol=2e-4)
    # The same images in the same order, except where two scores tie (then either order is right).
    served_ids = [match["id"] for match in entry["matches"]]
    for position, (served, expected) in enumerate(zip(served_ids, ids, strict=True)):
        neighbours = scores[max(position - 1, 0) : position + 2]
        tied = len(neighbours) > 1 and np.min(np.abs(np.diff(neighbours))) < 2e-4
        assert served == expected or tied, (served_ids, ids, scores)
    assert set(entry["matches"][0]) >= {"id", "path", "url", "thumbnail_url", "score"}


# ---------------------------------------------------------------- text queries


def test_info_says_text_search_is_on_with_its_limits(serve_base_url: str) -> None:
    info = requests.get(f"{serve_base_url}/info", timeout=30).json()
    assert info["text_search"] is True
    assert info["max_text_chars"] == LIMITS.max_text_chars
    assert info["max_texts"] == LIMITS.max_texts and info["max_queries"] == LIMITS.max_queries


def test_text_scores_are_cosines_against_the_index(
    serve_base_url: str, text_encoder: ClipTextEncoder, index_vectors: np.ndarray
) -> None:
    response = post(serve_base_url, texts=["a red bicycle by a canal"], params={"k": 7})
    assert response.status_code == 200, response.text
    (entry,) = response.json()["results"]
    assert entry["text"] == "a red bicycle by a canal" and "truncated" not in entry and "filename" not in entry
    vectors, _ = text_encoder.encode(["a red bicycle by a canal"])
    assert_matches(entry, *expected_top(vectors[0], index_vectors, 7))


def test_files_then_texts_each_get_an_entry_in_request_order(
    serve_base_url: str, indexed_images: list[Path], text_encoder: ClipTextEncoder, index_vectors: np.ndarray
) -> None:
    photos = indexed_images[:2]
    texts = ["sunset over the sea", "東京の夜", "🚲"]
    response = post(serve_base_url, files=[(p.name, p.read_bytes()) for p in photos], texts=texts)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [entry.get("filename") for entry in results[:2]] == [p.name for p in photos]
    assert [entry.get("text") for entry in results[2:]] == texts
    assert results[0]["matches"][0]["id"] == 0 and results[1]["matches"][0]["id"] == 1
    vectors, _ = text_encoder.encode(texts)
    for entry, vector in zip(results[2:], vectors, strict=True):
        assert_matches(entry, *expected_top(vector, index_vectors, 5))


def test_get_search_answers_one_text_query(
    serve_base_url: str, text_encoder: ClipTextEncoder, index_vectors: np.ndarray
) -> None:
    response = requests.get(f"{serve_base_url}/search", params={"q": "Two CATS on a table", "k": 3}, timeout=60)
    assert response.status_code == 200, response.text
    (entry,) = response.json()["results"]
    assert entry["text"] == "Two CATS on a table"
    vectors, _ = text_encoder.encode(["Two CATS on a table"])
    assert_matches(entry, *expected_top(vectors[0], index_vectors, 3))


def test_a_text_only_form_may_be_urlencoded(serve_base_url: str) -> None:
    response = requests.post(
        f"{serve_base_url}/search", data={"text": ["a dog", "a café"]}, params={"k": 2}, timeout=60
    )
    assert response.status_code == 200, response.text
    assert response.request.headers["content-type"] == "application/x-www-form-urlencoded"
    results = response.json()["results"]
    assert [entry["text"] for entry in results] == ["a dog", "a café"]
    assert all(len(entry["matches"]) == 2 for entry in results)
    same = post(serve_base_url, texts=["a dog"], params={"k": 2}).json()["results"][0]
    assert same["matches"] == results[0]["matches"]


def test_a_text_longer_than_the_model_reads_is_truncated_and_says_so(serve_base_url: str) -> None:
    response = requests.get(f"{serve_base_url}/search", params={"q": LONG_TEXT}, timeout=60)
    assert response.status_code == 200, response.text
    (entry,) = response.json()["results"]
    assert entry["truncated"] is True and entry["text"] == LONG_TEXT


# ---------------------------------------------------------------- bad text


@pytest.mark.parametrize(
    ("text", "status", "code"),
    [
        ("   \t ", 400, "empty_text"),
        ("bell\x07", 400, "invalid_text"),
        ("nul\x00byte", 400, "invalid_text"),
        ("x" * (LIMITS.max_text_chars + 1), 413, "text_too_long"),
        ("é" * (LIMITS.max_text_chars + 1), 413, "text_too_long"),
    ],
    ids=["blank", "bell", "nul", "too-long", "too-long-2-byte"],
)
def test_bad_texts_are_4xx_alone_and_entry_errors_beside_a_good_query(
    serve_base_url: str, indexed_images: list[Path], text: str, status: int, code: str
) -> None:
    assert_error(post(serve_base_url, texts=[text]), status, code)
    photo = indexed_images[0]
    response = post(serve_base_url, files=[(photo.name, photo.read_bytes())], texts=[text, "a dog"])
    assert response.status_code == 200, response.text
    good_photo, bad, good_text = response.json()["results"]
    assert good_photo["matches"] and good_text["matches"] and good_text["text"] == "a dog"
    assert bad["error"]["code"] == code and "matches" not in bad
    assert "\x00" not in bad["text"] and "\x07" not in bad["text"] and len(bad["text"]) <= 200


def test_invalid_utf8_in_a_text_field_is_a_400(serve_base_url: str) -> None:
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\n'.encode()
        + b"caf\xc3\x28 \xff"
        + f"\r\n--{boundary}--\r\n".encode()
    )
    response = requests.post(
        f"{serve_base_url}/search",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=60,
    )
    assert_error(response, 400, "invalid_text")
    get = requests.get(f"{serve_base_url}/search?q=caf%C3%28", timeout=60)
    assert_error(get, 400, "invalid_text")


def test_query_counts_are_limited_per_kind_and_together(serve_base_url: str, indexed_images: list[Path]) -> None:
    assert_error(post(serve_base_url, texts=["a dog"] * (LIMITS.max_texts + 1)), 413, "too_many_texts")
    photos = [(p.name, p.read_bytes()) for p in indexed_images[:4]]
    texts = ["a dog"] * (LIMITS.max_queries - len(photos) + 1)
    assert_error(post(serve_base_url, files=photos, texts=texts), 413, "too_many_queries")


def test_get_without_q_or_with_two_is_a_400(serve_base_url: str) -> None:
    assert_error(requests.get(f"{serve_base_url}/search", timeout=60), 400, "no_query")
    assert_error(requests.get(f"{serve_base_url}/search?q=a&q=b", timeout=60), 400, "malformed_request")
    assert_error(requests.get(f"{serve_base_url}/search?q=dog&k=0", timeout=60), 422, "invalid_k")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=60))
def test_any_unicode_text_gets_an_answer_or_a_4xx(serve_base_url: str, text: str) -> None:
    response = post(serve_base_url, texts=[text])
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    body = response.json()
    if response.status_code == 200:
        assert body["results"][0]["matches"]
    else:
        assert body["error"]["code"] in {"empty_text", "invalid_text"}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=40))
def test_any_bytes_as_q_get_an_answer_or_a_4xx(serve_base_url: str, raw: bytes) -> None:
    response = requests.get(f"{serve_base_url}/search?q={quote_from_bytes(raw)}", timeout=60)
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text


# ---------------------------------------------------------------- combined queries


def test_combined_query_is_the_normalised_weighted_sum(
    serve_base_url: str,
    indexed_images: list[Path],
    text_encoder: ClipTextEncoder,
    image_encoder: ClipImageEncoder,
    index_vectors: np.ndarray,
) -> None:
    photo = indexed_images[3]
    texts = ["at night", "people"]
    response = post(
        serve_base_url,
        "/search/combined",
        files=[(photo.name, photo.read_bytes())],
        texts=texts,
        params={"k": 6},
        data={"file_weight": ["1"], "text_weight": ["0.5", "-1"]},
    )
    assert response.status_code == 200, response.text
    (entry,) = response.json()["results"]
    assert entry["combined"] == [
        {"filename": photo.name, "weight": 1.0},
        {"text": "at night", "weight": 0.5},
        {"text": "people", "weight": -1.0},
    ]
    crop = pixels_from_bytes(photo.read_bytes(), image_encoder.spec, photo.name, 50_000_000)
    image_vector = image_encoder.encode_pixels(crop[None])[0]
    text_vectors, _ = text_encoder.encode(texts)
    query = weighted_sum(np.vstack([image_vector[None], text_vectors]), [1.0, 0.5, -1.0])
    assert_matches(entry, *expected_top(query, index_vectors, 6))


def test_combined_weights_default_to_one_and_scale_does_not_matter(
    serve_base_url: str, indexed_images: list[Path]
) -> None:
    photo = indexed_images[5]
    files = [(photo.name, photo.read_bytes())]
    alone = post(serve_base_url, files=files).json()["results"][0]["matches"]
    default = post(serve_base_url, "/search/combined", files=files).json()["results"][0]
    doubled = post(serve_base_url, "/search/combined", files=files, data={"file_weight": ["2"]}).json()["results"][0]
    assert default["combined"] == [{"filename": photo.name, "weight": 1.0}]
    for entry in (default, doubled):
        assert [m["id"] for m in entry["matches"]] == [m["id"] for m in alone]
        np.testing.assert_allclose([m["score"] for m in entry["matches"]], [m["score"] for m in alone], atol=2e-4)


def test_a_combined_long_text_says_truncated(serve_base_url: str) -> None:
    response = post(serve_base_url, "/search/combined", texts=[LONG_TEXT, "a dog"])
    assert response.status_code == 200, response.text
    long_part, short_part = response.json()["results"][0]["combined"]
    assert long_part["truncated"] is True and "truncated" not in short_part


@pytest.mark.parametrize(
    ("data", "texts", "status", "code"),
    [
        ({"text_weight": ["nan"]}, ["a dog"], 422, "invalid_weights"),
        ({"text_weight": ["inf"]}, ["a dog"], 422, "invalid_weights"),
        ({"text_weight": ["1e999"]}, ["a dog"], 422, "invalid_weights"),
        ({"text_weight": ["1"]}, ["a dog", "a cat"], 422, "invalid_weights"),
        ({"text_weight": ["1", "2", "3"]}, ["a dog", "a cat"], 422, "invalid_weights"),
        ({"text_weight": ["0", "0"]}, ["a dog", "a cat"], 422, "zero_query"),
        ({"text_weight": ["1", "-1"]}, ["a dog", "A DOG"], 422, "zero_query"),
        ({"note": ["no query here"]}, [], 400, "no_files"),
        ({}, ["a dog", " "], 400, "empty_text"),
    ],
    ids=["nan", "inf", "overflow", "too-few", "too-many", "all-zero", "cancel-out", "nothing", "one-empty"],
)
def test_bad_combined_queries_are_4xx(
    serve_base_url: str, data: dict, texts: list[str], status: int, code: str
) -> None:
    assert_error(post(serve_base_url, "/search/combined", texts=texts, data=data), status, code)


def test_a_bad_photo_fails_the_whole_combined_query(serve_base_url: str, indexed_images: list[Path]) -> None:
    good = indexed_images[0]
    response = post(
        serve_base_url, "/search/combined", files=[(good.name, good.read_bytes()), ("notes.jpg", b"not an image")]
    )
    error = assert_error(response, 400, "not_an_image")
    assert error["filename"] == "notes.jpg"


# ---------------------------------------------------------------- batching


def test_concurrent_text_queries_are_batched_in_their_own_queue(serve_base_url: str) -> None:
    from ray import serve

    from tests.conftest import APP_NAME

    embedder = serve.get_deployment_handle("Embedder", app_name=APP_NAME)
    images_before = embedder.batch_size_counts.remote().result()
    texts_before = embedder.text_batch_size_counts.remote().result()
    texts = [f"query number {i}" for i in range(32)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda text: post(serve_base_url, texts=[text]), texts))
    assert all(r.status_code == 200 for r in responses)
    texts_after = embedder.text_batch_size_counts.remote().result()
    new = {size: texts_after.get(size, 0) - texts_before.get(size, 0) for size in texts_after}
    assert sum(size * n for size, n in new.items()) == 32
    assert any(size > 1 and n > 0 for size, n in new.items()), new
    # No image forward pass ran for them.
    assert embedder.batch_size_counts.remote().result() == images_before


# ---------------------------------------------------------------- a checkpoint without a tokenizer


@pytest.fixture(scope="module")
def no_text_url(
    serve_base_url: str, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, index_dir: Path
) -> Iterator[str]:
    """The same weights as the main app (same seed, same fingerprint, same index), no tokenizer."""
    from ray import serve

    from serve_app.app import build_app
    from serve_app.config import AppArgs

    folder = make_clip_checkpoint(tmp_path_factory.mktemp("clip-no-tokenizer"), tokenizer=False)
    assert not (folder / "tokenizer.json").exists() and (tiny_model_dir / "tokenizer.json").exists()
    args = AppArgs.model_validate({"model": str(folder), "index": str(index_dir), "embedder": {"num_threads": 1}})
    serve.run(build_app(args), name=NO_TEXT_APP, route_prefix=NO_TEXT_PREFIX, blocking=False)
    url = serve_base_url + NO_TEXT_PREFIX
    wait_until_ok(f"{url}/healthz")
    yield url
    serve.delete(NO_TEXT_APP)


def test_without_a_tokenizer_photos_work_and_texts_are_a_clear_4xx(
    no_text_url: str, indexed_images: list[Path]
) -> None:
    info = requests.get(f"{no_text_url}/info", timeout=30).json()
    assert info["text_search"] is False
    photo = indexed_images[2]
    alone = post(no_text_url, files=[(photo.name, photo.read_bytes())])
    assert alone.status_code == 200 and alone.json()["results"][0]["matches"][0]["id"] == 2

    assert_error(
        requests.get(f"{no_text_url}/search", params={"q": "a dog"}, timeout=60), 400, "text_search_unavailable"
    )
    assert_error(post(no_text_url, texts=["a dog"]), 400, "text_search_unavailable")
    assert_error(post(no_text_url, "/search/combined", texts=["a dog"]), 400, "text_search_unavailable")
    mixed = post(no_text_url, files=[(photo.name, photo.read_bytes())], texts=["a dog"])
    assert mixed.status_code == 200, mixed.text
    photo_entry, text_entry = mixed.json()["results"]
    assert photo_entry["matches"] and text_entry["error"]["code"] == "text_search_unavailable"
