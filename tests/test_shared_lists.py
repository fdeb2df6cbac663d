"""Small Flat segments searched through the IVF host's lists answer as one IVF index over the live vectors."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from image_search.faiss_index import build_faiss_index, ivf_centroids
from image_search.index_spec import IndexSpec
from image_search.manifest import ImageRecord
from image_search.segment_search import search_segments, searchable
from image_search.segments import Version, build_segment, with_changes
from image_search.shared_lists import FiledRows, file_under, host_lists, largest_host
from image_search.storage import LocalStore
from serve_app.config import SearcherOptions
from serve_app.deployments.searcher import assemble_index, load_segment

DIM = 16
NLIST = 16


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def one_ivf_index(centroids: np.ndarray, live: dict[int, np.ndarray], nprobe: int) -> faiss.Index:
    """The reference: one IVF-Flat index over every live vector, with the host's centroids."""
    quantizer = faiss.IndexFlatIP(DIM)
    quantizer.add(centroids)
    index = faiss.IndexIVFFlat(quantizer, DIM, len(centroids), faiss.METRIC_INNER_PRODUCT)
    ids = np.array(sorted(live), dtype=np.int64)
    index.add_with_ids(np.stack([live[i] for i in ids]), ids)
    index.nprobe = nprobe
    return index  # (faiss's constructor keeps `quantizer` alive with it)


def version_of_host_and_small_segments(nprobe: int):  # type: ignore[no-untyped-def]
    """A trained IVF host of 640 vectors and three Flat segments of 40, with dead ids in all four."""
    rng = np.random.default_rng(7)
    host_vectors = unit(rng, 640)
    host = build_faiss_index(host_vectors, IndexSpec(f"IVF{NLIST},Flat", {"nprobe": nprobe}), np.arange(640))
    segments = [("host", host, list(range(0, 640, 7)))]
    live = {i: host_vectors[i] for i in range(640) if i % 7}
    for number in range(3):
        ids = np.arange(1000 + 100 * number, 1040 + 100 * number)
        vectors = unit(rng, len(ids))
        small = build_faiss_index(vectors, IndexSpec("Flat"), ids)
        dead = ids[::5].tolist()
        segments.append((f"small{number}", small, dead))
        live.update({int(i): v for i, v in zip(ids, vectors, strict=True) if int(i) not in dead})
    return segments, live, ivf_centroids(host)


@pytest.mark.parametrize("nprobe", [1, 3, NLIST])
def test_filed_segments_answer_as_one_ivf_index_over_the_live_vectors(nprobe: int) -> None:
    segments, live, centroids = version_of_host_and_small_segments(nprobe)
    host = host_lists("host", segments[0][1])
    assert host is not None
    searchables = [searchable("host", segments[0][1], segments[0][2], lists=host)]
    for name, index, dead in segments[1:]:
        filed = file_under(host, index)
        assert filed is not None and filed.host is host
        searchables.append(searchable(name, index, dead, lists=filed))
    queries = unit(np.random.default_rng(8), 25)
    k = 10
    scores, ids = search_segments(searchables, queries, k)
    want_scores, want_ids = one_ivf_index(centroids, live, nprobe).search(queries, k)
    assert ids.tolist() == want_ids.tolist()
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    dead = {i for _, _, dead_ids in segments for i in dead_ids}
    assert not dead & set(ids.ravel().tolist())


def test_with_every_list_probed_the_filed_search_is_exact() -> None:
    segments, live, _ = version_of_host_and_small_segments(NLIST)
    host = host_lists("host", segments[0][1])
    assert host is not None
    searchables = [searchable("host", segments[0][1], segments[0][2], lists=host)]
    searchables += [searchable(n, i, d, lists=file_under(host, i)) for n, i, d in segments[1:]]
    queries = unit(np.random.default_rng(9), 10)
    scores, ids = search_segments(searchables, queries, 5)
    matrix_ids = np.array(sorted(live))
    exact = queries @ np.stack([live[i] for i in matrix_ids]).T
    order = np.argsort(-exact, axis=1)[:, :5]
    assert ids.tolist() == matrix_ids[order].tolist()
    np.testing.assert_allclose(scores, np.take_along_axis(exact, order, axis=1), atol=1e-5)


def test_only_an_inner_product_ivf_flat_hosts_and_only_a_flat_segment_is_filed() -> None:
    segments, _, _ = version_of_host_and_small_segments(2)
    flat = segments[1][1]
    assert host_lists("small0", flat) is None
    host = host_lists("host", segments[0][1])
    assert host is not None
    assert file_under(host, segments[0][1]) is None  # an IVF segment keeps its own lists
    inner_product_flat = build_faiss_index(unit(np.random.default_rng(1), 50), IndexSpec("Flat"), np.arange(50))
    assert file_under(host, faiss.IndexIDMap2(faiss.IndexFlatL2(DIM))) is None
    assert file_under(host, inner_product_flat) is not None


def test_the_largest_live_ivf_segment_hosts() -> None:
    segments, _, _ = version_of_host_and_small_segments(2)
    big = host_lists("big", segments[0][1])
    other = host_lists("other", segments[0][1])
    assert largest_host([(None, 10_000), (other, 50), (big, 500)]) is big
    assert largest_host([(None, 10_000)]) is None
    assert largest_host([]) is None


def test_a_searcher_files_its_flat_segments_once_and_keeps_them_across_versions(tmp_path: Path) -> None:
    """assemble_index: the Flat segments of a version with an IVF segment are filed under it, and a
    second version over the same segments reuses the filing (built once per segment and host)."""
    store = LocalStore(tmp_path / "index")
    cache = tmp_path / "cache"
    rng = np.random.default_rng(3)
    records = [ImageRecord(i, f"k{i}.jpg", 1, "00") for i in range(700)]
    big = build_segment(store, np.arange(640), unit(rng, 640), records[:640], DIM, IndexSpec(f"IVF{NLIST},Flat"))
    small = build_segment(store, np.arange(640, 700), unit(rng, 60), records[640:], DIM, IndexSpec("Flat"))
    first = Version("v1", "m", "f", DIM, {}, "fp32", "/src", (big, small), {}, 700)
    second = with_changes(first, name="v2", delete={small.name: [640, 641]})
    loaded = [load_segment(store, SearcherOptions(), cache, info) for info in first.segments]
    one, two = assemble_index(first, loaded), assemble_index(second, loaded)
    (host_one, small_one), (host_two, small_two) = one.segments, two.segments
    assert host_one.lists is not None and host_one.lists is loaded[0].lists is host_two.lists
    assert isinstance(small_one.lists, FiledRows) and small_one.lists.host.name == big.name
    assert small_two.lists is small_one.lists  # filed once, not per version
    assert small_two.live_count == 58
    queries = unit(np.random.default_rng(4), 5)
    _, ids = search_segments(two.segments, queries, 20)
    assert not {640, 641} & set(ids.ravel().tolist())


def test_a_version_without_an_ivf_segment_files_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "index")
    rng = np.random.default_rng(5)
    records = [ImageRecord(i, f"k{i}.jpg", 1, "00") for i in range(80)]
    infos = (
        build_segment(store, np.arange(40), unit(rng, 40), records[:40], DIM, IndexSpec("Flat")),
        build_segment(store, np.arange(40, 80), unit(rng, 40), records[40:], DIM, IndexSpec("Flat")),
    )
    version = Version("v1", "m", "f", DIM, {}, "fp32", "/src", infos, {}, 80)
    loaded = [load_segment(store, SearcherOptions(), tmp_path / "cache", info) for info in infos]
    assert all(segment.lists is None for segment in assemble_index(version, loaded).segments)
