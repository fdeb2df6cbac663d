"""The benchmark's CLIP-like mixture has the shape its docstring claims (small sizes, one core)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.clip_like_data import ClipLikeMixture, collection_and_queries, cosine_to_topic_mean


@pytest.fixture(scope="module")
def drawn() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return collection_and_queries(ClipLikeMixture(dim=128, clusters=200, seed=5), 20_000, 200)


def test_vectors_are_unit_float32(drawn: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    vectors, _, queries = drawn
    assert vectors.dtype == queries.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_members_sit_at_cosine_07_to_09_of_their_topic_mean(drawn: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    vectors, labels, _ = drawn
    big = np.isin(labels, np.flatnonzero(np.bincount(labels) >= 50))  # means of tiny topics are noisy
    low, median, high = np.percentile(cosine_to_topic_mean(vectors[big], labels[big]), [5, 50, 95])
    assert 0.68 < low < median < high < 0.92, (low, median, high)


def test_topic_sizes_follow_zipf(drawn: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    _, labels, _ = drawn
    sizes = np.bincount(labels, minlength=200)
    harmonic = np.sum(1 / np.arange(1, 201))
    assert abs(sizes[0] / len(labels) - 1 / harmonic) < 0.02
    assert 5 < sizes[0] / sizes[9] < 20  # share ~ 1/rank: the 10th topic ~1/10 of the first
    assert sizes[0] / np.median(sizes) > 30  # the median topic (rank ~100) is rare


def test_queries_are_fresh_draws_not_indexed_vectors(drawn: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    vectors, _, queries = drawn
    assert float(np.max(queries @ vectors.T)) < 0.999


def test_unrelated_vectors_share_a_cone(drawn: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    vectors, labels, _ = drawn
    first, second = vectors[:500], vectors[500:1000]
    other = labels[:500] != labels[500:1000]
    cosine = np.sum(first * second, axis=1)[other]
    assert 0.2 < float(np.median(cosine)) < 0.6
