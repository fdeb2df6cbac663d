"""The fp16 scan of small Flat segments answers exactly what the fp32 Flat search answers."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from image_search import fp16_scan
from image_search.fp16_scan import FP16_SCAN_MIN_ROWS, Fp16Scan
from image_search.segment_search import search_segments, searchable

DIM = 32


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def flat_segment(vectors: np.ndarray, first_id: int = 0) -> faiss.Index:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(vectors, np.arange(first_id, first_id + len(vectors), dtype=np.int64))
    return index


def brute_force(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    return np.stack([ids[np.lexsort((ids, -row))[:k]] for row in scores])


def test_small_and_non_flat_segments_get_no_fp16_scan() -> None:
    rng = np.random.default_rng(0)
    assert Fp16Scan.of(flat_segment(unit(rng, FP16_SCAN_MIN_ROWS - 1))) is None
    assert Fp16Scan.of(flat_segment(unit(rng, FP16_SCAN_MIN_ROWS))) is not None
    quantizer = faiss.IndexFlatIP(DIM)
    ivf = faiss.IndexIVFFlat(quantizer, DIM, 4, faiss.METRIC_INNER_PRODUCT)
    vectors = unit(rng, FP16_SCAN_MIN_ROWS)
    ivf.train(vectors)
    wrapped = faiss.IndexIDMap2(ivf)
    wrapped.add_with_ids(vectors, np.arange(FP16_SCAN_MIN_ROWS, dtype=np.int64))
    assert Fp16Scan.of(wrapped) is None
    l2 = faiss.IndexIDMap2(faiss.IndexFlatL2(DIM))
    l2.add_with_ids(vectors, np.arange(FP16_SCAN_MIN_ROWS, dtype=np.int64))
    assert Fp16Scan.of(l2) is None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(FP16_SCAN_MIN_ROWS, FP16_SCAN_MIN_ROWS + 2_000),
    dead_share=st.sampled_from([0.0, 0.01, 0.5, 0.99]),
    k=st.sampled_from([1, 5, 10, 50]),
)
def test_fp16_scan_equals_the_fp32_flat_search_and_brute_force(seed: int, rows: int, dead_share: float, k: int) -> None:
    rng = np.random.default_rng(seed)
    vectors = unit(rng, rows)
    index = flat_segment(vectors, first_id=1_000)
    ids = np.arange(1_000, 1_000 + rows, dtype=np.int64)
    dead = ids[rng.random(rows) < dead_share]
    queries = np.concatenate([unit(rng, 6), vectors[:2]])  # fresh queries, and rows of the segment itself
    fast = searchable("s", index, dead, Fp16Scan.of(index))
    plain = searchable("s", index, dead)
    assert fast.fp16_scan is not None
    got_scores, got_ids = search_segments([fast], queries, k)
    want_scores, want_ids = search_segments([plain], queries, k)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    live = ~np.isin(ids, dead)
    want_brute = brute_force(vectors[live], ids[live], queries, k)
    got_live = got_ids[:, : min(k, live.sum())]
    # Identical ids, except where float32 scores cannot order a near-tie that float64 can: there
    # the exact scores of what came back must equal brute force's, rank by rank.
    exact = queries.astype(np.float64) @ vectors.astype(np.float64).T
    rank = {int(i): row for row, i in enumerate(ids)}
    got_exact = np.array([[exact[q, rank[int(i)]] for i in row] for q, row in enumerate(got_live)])
    want_exact = np.array([[exact[q, rank[int(i)]] for i in row] for q, row in enumerate(want_brute)])
    np.testing.assert_allclose(got_exact, want_exact, atol=1e-6)
    assert (np.mean(got_live == want_brute)) > 0.99


def test_near_ties_that_fp16_cannot_order_fall_back_to_the_exact_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows that differ below fp16's resolution: the bound check cannot rule out the rows left out,
    so those queries are answered by the fp32 index, and the answer is still the exact one."""
    rng = np.random.default_rng(7)
    base = unit(rng, 1)[0]
    noise = rng.normal(size=(FP16_SCAN_MIN_ROWS, DIM)).astype(np.float32) * 1e-5
    vectors = base + noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = flat_segment(vectors)
    scan = Fp16Scan.of(index)
    assert scan is not None
    fallbacks: list[int] = []
    seen = index.search

    def counting(x: np.ndarray, k: int, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        fallbacks.append(len(x))
        return seen(x, k, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(index, "search", counting)
    queries = base[None, :].astype(np.float32)
    got_scores, got_ids = scan.search(index, None, None, queries, 10, FP16_SCAN_MIN_ROWS)
    assert fallbacks == [1]
    want_scores, want_ids = seen(queries, 10)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-6)


def test_the_error_bound_covers_fp16_rounding_of_unit_rows() -> None:
    rng = np.random.default_rng(3)
    vectors = unit(rng, 5_000, 512)
    queries = unit(rng, 50, 512)
    rounded = vectors.astype(np.float16).astype(np.float64)
    error = np.abs(queries.astype(np.float64) @ rounded.T - queries.astype(np.float64) @ vectors.astype(np.float64).T)
    assert error.max() <= fp16_scan.FP16_RELATIVE_ERROR
