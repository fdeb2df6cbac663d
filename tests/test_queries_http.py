"""The query routes over real HTTP against brute force on the tiny model: more like this
(GET /images/{id}/similar), filters inside the scan (`prefix`, `min_score`) on every search route,
GET /folders, and de-duplicated results (`dedup=true`) on a collection with copies, re-encodings
and crops. Every bad input of these parameters is a 4xx."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from serve_app.queries.dedup import collapse
from tests.conftest import REQUEST_TIMEOUT_S
from tests.living import build, served_app
from tests.support import post_search, write_image_folder


@dataclass(frozen=True)
class Reference:
    """The published version's live images: ids, keys and stored vectors (what brute force scores)."""

    ids: np.ndarray
    keys: list[str]
    vectors: np.ndarray

    def top(self, query: np.ndarray, k: int, allowed: set[int] | None = None, exclude: int | None = None) -> list[int]:
        keep = [
            i
            for i, image_id in enumerate(self.ids.tolist())
            if (allowed is None or image_id in allowed) and image_id != exclude
        ]
        scores = self.vectors[keep] @ query
        ids = self.ids[keep]
        return [int(ids[i]) for i in np.lexsort((ids, -scores))[:k]]

    def with_prefix(self, *prefixes: str) -> set[int]:
        return {int(i) for i, key in zip(self.ids, self.keys, strict=True) if key.startswith(prefixes)}

    def vector(self, image_id: int) -> np.ndarray:
        return self.vectors[self.ids.tolist().index(image_id)]


def reference_of(index_dir: Path) -> Reference:
    from image_search.artifact import load_artifact
    from image_search.storage import LocalStore

    loaded = load_artifact(LocalStore(index_dir))
    records = loaded.manifest.records
    ids = np.asarray([record.id for record in records], dtype=np.int64)
    vectors = np.stack([loaded.index.reconstruct(int(i)) for i in ids])
    return Reference(ids, [record.key for record in records], vectors)


@pytest.fixture(scope="module")
def reference(index_dir: Path) -> Reference:
    return reference_of(index_dir)


def get(base_url: str, path: str, params: object = None) -> requests.Response:
    return requests.get(f"{base_url}{path}", params=params, timeout=REQUEST_TIMEOUT_S)


def match_ids(body: dict, entry: int = 0) -> list[int]:
    return [match["id"] for match in body["results"][entry]["matches"]]


def search_vectors(base_url: str, vectors: list, k: int, params: object = None) -> requests.Response:
    return requests.post(
        f"{base_url}/search/vectors", json={"vectors": vectors, "k": k}, params=params, timeout=REQUEST_TIMEOUT_S
    )


# --- more like this ---------------------------------------------------------------------------------


def test_similar_answers_the_k_nearest_other_images(serve_base_url: str, reference: Reference) -> None:
    for image_id in reference.ids[:6].tolist():
        response = get(serve_base_url, f"/images/{image_id}/similar", {"k": 5})
        assert response.status_code == 200
        body = response.json()
        assert body["results"][0]["id"] == image_id
        got = match_ids(body)
        assert image_id not in got  # itself excluded
        assert got == reference.top(reference.vector(image_id), 5, exclude=image_id)
        want_scores = [float(reference.vector(image_id) @ reference.vector(i)) for i in got]
        assert np.allclose([m["score"] for m in body["results"][0]["matches"]], want_scores, atol=1e-5)


def test_similar_with_k_of_the_whole_collection_holds_every_other_image(
    serve_base_url: str, reference: Reference
) -> None:
    image_id = int(reference.ids[3])
    body = get(serve_base_url, f"/images/{image_id}/similar", {"k": 100}).json()
    assert sorted(match_ids(body)) == sorted(set(reference.ids.tolist()) - {image_id})


def test_similar_of_an_unknown_id_is_404(serve_base_url: str, reference: Reference) -> None:
    for raw in (str(int(reference.ids.max()) + 1000), "abc", "-1"):
        response = get(serve_base_url, f"/images/{raw}/similar")
        assert response.status_code == 404, raw
        assert response.json()["error"]["code"] == "not_found"


# --- filters ----------------------------------------------------------------------------------------


def test_prefix_filters_vector_search_to_exactly_the_brute_force_top_k_of_the_subset(
    serve_base_url: str, reference: Reference
) -> None:
    rng = np.random.default_rng(4)
    queries = rng.standard_normal((3, reference.vectors.shape[1]))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for prefixes in (["nested/"], ["nested/img_000"], ["img_001", "nested/img_002"]):
        allowed = reference.with_prefix(*prefixes)
        assert 0 < len(allowed) < len(reference.ids)
        body = search_vectors(serve_base_url, queries.tolist(), 5, [("prefix", p) for p in prefixes]).json()
        for row in range(3):
            got = match_ids(body, row)
            assert got == reference.top(queries[row], 5, allowed), prefixes
            assert len(got) == min(5, len(allowed))  # k whenever k match; all of them when fewer do
    assert len(reference.with_prefix("nested/img_000")) < 5  # the case of fewer than k matching


def test_prefix_filters_similar_and_the_image_itself_stays_out(serve_base_url: str, reference: Reference) -> None:
    nested = reference.with_prefix("nested/")
    image_id = min(nested)
    body = get(serve_base_url, f"/images/{image_id}/similar", {"k": 5, "prefix": "nested/"}).json()
    assert match_ids(body) == reference.top(reference.vector(image_id), 5, nested, exclude=image_id)


def test_prefix_filters_the_text_photo_and_combined_searches(
    serve_base_url: str, reference: Reference, image_folder: Path
) -> None:
    allowed = reference.with_prefix("nested/")
    text_vector = np.asarray(
        requests.post(f"{serve_base_url}/embed", data={"text": "a red circle"}, timeout=REQUEST_TIMEOUT_S).json()[
            "embeddings"
        ][0]["vector"]
    )
    by_text = get(serve_base_url, "/search", {"q": "a red circle", "k": 4, "prefix": "nested/"}).json()
    assert match_ids(by_text) == reference.top(text_vector, 4, allowed)

    photo = image_folder / reference.keys[1]
    upload = [(photo.name, photo.read_bytes())]
    by_photo = post_search(serve_base_url, upload, params={"k": 4, "prefix": "nested/"}).json()
    photo_vector = reference.vector(int(reference.ids[1]))
    assert match_ids(by_photo) == reference.top(photo_vector, 4, allowed)
    combined = post_search(serve_base_url, upload, params={"k": 4, "prefix": "nested/"}, route="/search/combined")
    assert match_ids(combined.json()) == match_ids(by_photo)  # one photo, weight 1: the same direction


def test_min_score_drops_matches_below_it(serve_base_url: str, reference: Reference) -> None:
    image_id = int(reference.ids[0])
    full = get(serve_base_url, f"/images/{image_id}/similar", {"k": 10}).json()["results"][0]["matches"]
    # The cut goes halfway between two printed scores at least 1e-5 apart, from the 5th match on:
    # scores print rounded to 6 decimals, so a cut equal to a printed score may sit just above the
    # true score it was rounded from, and that match would rightly be dropped.
    scores = [m["score"] for m in full]
    gap = next(i for i in range(4, len(scores) - 1) if scores[i] - scores[i + 1] >= 1e-5)
    cut = (scores[gap] + scores[gap + 1]) / 2
    kept = get(serve_base_url, f"/images/{image_id}/similar", {"k": 10, "min_score": cut}).json()
    assert [m["id"] for m in kept["results"][0]["matches"]] == [m["id"] for m in full[: gap + 1]]
    assert len(kept["results"][0]["matches"]) < 10


def test_folders_lists_first_level_prefixes_with_counts(serve_base_url: str, reference: Reference) -> None:
    body = get(serve_base_url, "/folders").json()
    nested = len(reference.with_prefix("nested/"))
    assert body["folders"] == [{"prefix": "nested/", "count": nested}]
    assert body["top_level_images"] == len(reference.ids) - nested
    assert body["index_version"]


@pytest.mark.parametrize(
    "params",
    [
        {"prefix": ""},
        {"prefix": "x" * 2000},
        {"min_score": "high"},
        {"min_score": "2"},
        {"min_score": "nan"},
        {"dedup": "perhaps"},
    ],
)
def test_bad_filter_values_are_422_on_every_search_route(
    serve_base_url: str, reference: Reference, image_folder: Path, params: dict
) -> None:
    image_id = int(reference.ids[0])
    photo = image_folder / reference.keys[0]
    dim = reference.vectors.shape[1]
    answers = [
        get(serve_base_url, f"/images/{image_id}/similar", params),
        get(serve_base_url, "/search", {"q": "a cat", **params}),
        post_search(serve_base_url, [(photo.name, photo.read_bytes())], params=params),
        post_search(serve_base_url, [(photo.name, photo.read_bytes())], params=params, route="/search/combined"),
        requests.post(f"{serve_base_url}/search/vectors", json={"vectors": [[1.0] * dim]}, params=params, timeout=15),
    ]
    for response in answers:
        assert response.status_code == 422, (response.url, response.text)
        assert response.json()["error"]["code"] == "invalid_filter"


def test_too_many_prefixes_are_422(serve_base_url: str, reference: Reference) -> None:
    response = get(serve_base_url, f"/images/{int(reference.ids[0])}/similar", [("prefix", str(i)) for i in range(17)])
    assert response.status_code == 422


# --- de-duplicated results --------------------------------------------------------------------------


@dataclass(frozen=True)
class DupCollection:
    base_url: str
    reference: Reference
    threshold: float


DEDUP_APP = "dedup"


def write_duplicates(folder: Path) -> None:
    """Distinct photos, plus an exact copy, a re-encoding and a crop of some of them, in dups/."""
    originals = write_image_folder(folder, 8, start_seed=100)
    dups = folder / "dups"
    dups.mkdir()
    for n, path in enumerate(originals[:3]):
        shutil.copyfile(path, dups / f"copy_{n}{path.suffix}")
        image = Image.open(path).convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=60)
        (dups / f"reencoded_{n}.jpg").write_bytes(buffer.getvalue())
        w, h = image.size
        image.crop((4, 4, w - 4, h - 4)).save(dups / f"crop_{n}.png")


@pytest.fixture(scope="module")
def dup_collection(
    serve_port: int, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DupCollection]:
    root = tmp_path_factory.mktemp("dups")
    collection, out = root / "collection", root / "index"
    write_duplicates(collection)
    build(collection, out, tiny_model_dir)
    reference = reference_of(out)
    # The threshold between the copies' cosines and the distinct photos' (the tiny model is random:
    # its cosines are not CLIP's): crops of a photo sit near 0.999 to it, distinct photos below 0.99.
    threshold = 0.995
    args = {
        "model": str(tiny_model_dir),
        "index": str(out),
        "embedder": {"num_threads": 1},
        "limits": {"dedup_cosine": threshold},
        "request_timeout_s": REQUEST_TIMEOUT_S,
    }
    with served_app(DEDUP_APP, serve_port, args) as base_url:
        yield DupCollection(base_url, reference, threshold)


def test_dedup_collapses_near_duplicates_like_the_reference(dup_collection: DupCollection) -> None:
    ref = dup_collection.reference
    copy_id = next(int(i) for i, key in zip(ref.ids, ref.keys, strict=True) if key.startswith("dups/copy_0"))
    query = ref.vector(copy_id)
    k = 4
    body = search_vectors(dup_collection.base_url, [query.tolist()], k, {"dedup": "true"}).json()
    matches = body["results"][0]["matches"]
    order = ref.top(query, len(ref.ids))
    groups = collapse(np.stack([ref.vector(i) for i in order]), k, dup_collection.threshold)
    assert [m["id"] for m in matches] == [order[g.row] for g in groups]
    assert [sorted(m["duplicates"]) for m in matches] == [sorted(order[d] for d in g.duplicates) for g in groups]
    assert len(matches) == k  # k distinct groups: the collection has them
    # The byte-identical copy and its original have one vector: they are always one group.
    # The copy, the original, its re-encoding and its crop are one group.
    group = {matches[0]["id"], *matches[0]["duplicates"]}
    assert group == set(family(ref, 0).values())


def family(ref: Reference, n: int) -> dict[str, int]:
    """The ids of photo n of write_duplicates and of its copy, re-encoding and crop."""
    original = ("nested/img_0100.jpg", "img_0101.png", "img_0102.jpg")[n]
    names = {
        "original": original,
        "copy": f"dups/copy_{n}",
        "reencoded": f"dups/reencoded_{n}",
        "crop": f"dups/crop_{n}",
    }
    return {
        role: next(int(i) for i, key in zip(ref.ids, ref.keys, strict=True) if key.startswith(name))
        for role, name in names.items()
    }


def test_duplicates_answers_the_groups_of_a_brute_force_range_search(dup_collection: DupCollection) -> None:
    from serve_app.queries.duplicate_groups import group_pairs

    ref = dup_collection.reference
    sims = ref.vectors @ ref.vectors.T
    pairs = [
        (int(ref.ids[a]), int(ref.ids[b]))
        for a, b in zip(*np.nonzero(sims >= dup_collection.threshold), strict=True)
        if a < b
    ]
    want = group_pairs(pairs)
    body = get(dup_collection.base_url, "/duplicates").json()
    assert body["complete"] and body["threshold"] == dup_collection.threshold and body["index_version"]
    assert [group["ids"] for group in body["groups"]] == want
    assert body["total_groups"] == 3
    for n in range(3):
        ids = family(ref, n)
        (group,) = [g for g in body["groups"] if ids["original"] in g["ids"]]
        assert sorted(group["ids"]) == sorted(ids.values())
        # Only the byte-identical copy is marked identical; the re-encoding and the crop are similar.
        assert group["identical_sets"] == [sorted([ids["original"], ids["copy"]])]
        identical = {m["id"] for m in group["members"] if m["identical"]}
        assert identical == {ids["original"], ids["copy"]}
    page = get(dup_collection.base_url, "/duplicates", {"limit": 1, "offset": 1}).json()
    assert [g["ids"] for g in page["groups"]] == want[1:2]
    assert get(dup_collection.base_url, "/duplicates", {"threshold": 0.9999}).json()["total_groups"] == 3


@pytest.mark.parametrize(
    "params",
    [
        {"threshold": "0.5"},
        {"threshold": "1.01"},
        {"threshold": "nan"},
        {"threshold": "x"},
        {"limit": "0"},
        {"limit": "501"},
        {"limit": "-3"},
        {"offset": "-1"},
        {"offset": "1.5"},
    ],
)
def test_bad_duplicates_queries_are_422(serve_base_url: str, params: dict) -> None:
    response = get(serve_base_url, "/duplicates", params)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_duplicates_query"


def test_without_dedup_no_duplicates_field(dup_collection: DupCollection) -> None:
    ref = dup_collection.reference
    body = search_vectors(dup_collection.base_url, [ref.vectors[0].tolist()], 4).json()
    assert all("duplicates" not in m for m in body["results"][0]["matches"])
    assert len(body["results"][0]["matches"]) == 4
