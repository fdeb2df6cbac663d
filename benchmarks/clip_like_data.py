"""Synthetic unit vectors shaped like CLIP image embeddings, for telling index settings apart.

Uniform random vectors have no neighbourhoods (every IVF setting fails) and the old benchmark's 3000
equal clusters were so easy that nprobe 8 already gave recall 1.0. Real CLIP image embeddings sit
between: a few topics hold much of a collection, many are rare, and inside a topic the images are
near each other but not near-duplicates. The model, drawn with numpy, seeded:

- `clusters` topics with Zipf sizes: topic r (1-based) gets a share proportional to 1 / r**zipf_exponent
  (s = 1: with 2000 topics the largest holds ~12% of the collection, the median ~0.02%).
- Topic centres in a cone, like CLIP's (all embeddings share a common direction: two unrelated
  images still have a cosine around 0.4): c = sqrt(rho) * axis + sqrt(1 - rho) * v, v a random
  unit vector orthogonal to the axis, so two centres have cosine ~rho (`centre_cosine`, 0.6).
- A member is x = t * c + sqrt(1 - t**2) * u: its cosine to its topic centre (the direction of the
  topic's mean) is exactly t, drawn uniformly from `member_cosine` (0.7-0.9, the spread of real image
  embeddings around their class mean). u is unit noise orthogonal to c with an anisotropic spectrum:
  variance of the j-th of `dim` randomly rotated directions proportional to 1 / j**spectrum_decay
  (1.0: a participation ratio of ~28 dimensions at d = 512), so that members have nearer and farther
  neighbours, as real embeddings do, instead of being all equidistant as isotropic noise in 512-d makes them.
- Queries are fresh draws from the same mixture (own seed), never vectors of the indexed set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK = 100_000


@dataclass(frozen=True)
class ClipLikeMixture:
    dim: int = 512
    clusters: int = 2000
    zipf_exponent: float = 1.0
    centre_cosine: float = 0.6
    member_cosine: tuple[float, float] = (0.7, 0.9)
    spectrum_decay: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        low, high = self.member_cosine
        if not 0 < low <= high < 1:
            raise ValueError(f"member_cosine must be within (0, 1), not {self.member_cosine}")
        if not 0 <= self.centre_cosine < 1:
            raise ValueError(f"centre_cosine must be within [0, 1), not {self.centre_cosine}")


def _unit_rows(array: np.ndarray) -> np.ndarray:
    array /= np.linalg.norm(array, axis=1, keepdims=True)
    return array


def _orthogonal_unit(noise: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Each row of `noise` minus its component along the matching (unit) row of `directions`, unit."""
    noise -= np.sum(noise * directions, axis=1, keepdims=True) * directions
    return _unit_rows(noise)


class ClipLikeSampler:
    """Draws from one mixture: the centres, shares and noise spectrum are fixed by the mixture's seed."""

    def __init__(self, mixture: ClipLikeMixture) -> None:
        self.mixture = mixture
        rng = np.random.default_rng(mixture.seed)
        dim = mixture.dim
        axis = _unit_rows(rng.standard_normal((1, dim)))
        spread = _orthogonal_unit(rng.standard_normal((mixture.clusters, dim)), np.repeat(axis, mixture.clusters, 0))
        rho = mixture.centre_cosine
        self.centres = _unit_rows(np.sqrt(rho) * axis + np.sqrt(1 - rho) * spread).astype(np.float32)
        ranks = np.arange(1, mixture.clusters + 1, dtype=np.float64)
        self.shares = ranks**-mixture.zipf_exponent / np.sum(ranks**-mixture.zipf_exponent)
        scale = np.arange(1, dim + 1, dtype=np.float64) ** (-mixture.spectrum_decay / 2)
        rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        self.noise_basis = (scale[:, None] * rotation).astype(np.float32)  # rows: scaled rotated directions

    def draw(self, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(count x dim float32 unit vectors, their topic labels)."""
        rng = np.random.default_rng(seed)
        low, high = self.mixture.member_cosine
        vectors = np.empty((count, self.mixture.dim), dtype=np.float32)
        labels = rng.choice(self.mixture.clusters, size=count, p=self.shares)
        for start in range(0, count, CHUNK):
            rows = slice(start, min(count, start + CHUNK))
            size = rows.stop - rows.start
            centres = self.centres[labels[rows]]
            noise = _orthogonal_unit(
                rng.standard_normal((size, self.mixture.dim), dtype=np.float32) @ self.noise_basis, centres
            )
            cosine = rng.uniform(low, high, size=(size, 1)).astype(np.float32)
            vectors[rows] = _unit_rows(cosine * centres + np.sqrt(1 - cosine**2) * noise)
        return vectors, labels


def collection_and_queries(
    mixture: ClipLikeMixture, count: int, queries: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indexed vectors, their labels, fresh query vectors) from one mixture, with separate seeds."""
    sampler = ClipLikeSampler(mixture)
    vectors, labels = sampler.draw(count, mixture.seed + 1)
    fresh, _ = sampler.draw(queries, mixture.seed + 2)
    return vectors, labels, fresh


def cosine_to_topic_mean(vectors: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each vector's cosine to the normalised mean of its topic (what the docstring's 0.7-0.9 describes)."""
    sums = np.zeros((labels.max() + 1, vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, vectors)
    means = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return np.sum(vectors * means[labels].astype(np.float32), axis=1)
