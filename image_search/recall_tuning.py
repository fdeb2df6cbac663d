"""Tune an index's search knob (`nprobe` for IVF, `efSearch` for HNSW) to a recall target, measured.

After a build, the smallest knob value whose recall@k meets the target is the fastest one that does
(both the work and the latency of IVF and HNSW grow with it), so the tuner looks for that value.
Recall is measured on the collection itself, with nothing but the raw vectors the index was built from,
and the ground truth is an exact search of the sample's queries only (`sample_queries` x n, not n x n).

How the value is found, cheapest first (at 1M vectors a search of the whole sample at a high nprobe
takes tens of seconds on 2 cores, so the number of such searches is what tuning costs):

- IVF with Flat codes and a flat coarse quantiser (what the planner builds up to 1M vectors): an
  IVF-Flat search computes exact scores inside the lists it probes, so a true neighbour is found at
  nprobe p exactly when its list is among the query's p nearest centroids. One ranking of every
  centroid per query (`sample_queries` x nlist inner products) and the list of each true neighbour
  give the whole recall curve at once (`IvfFlatCurve`); the smallest p meeting the target on it is
  then checked by real searches at p and at p - 1 (the measured recall is the one reported). The
  curve counts exact ids, the measure is tie-aware, so the curve is never above the measure; when
  the checks disagree with it (ties, rounding) the search below takes over from there.
- Any other index (SQ8 or PQ codes, an HNSW coarse quantiser, HNSW): doubling from 1 (IVF) or k
  (HNSW) until the target is met, then bisection between the last value that missed and the first
  that met, stopped once they are within `LADDER_RATIO` of each other (the last few percent of
  nprobe buy nothing measurable and each step is a full sample search), and stopped early when two
  doublings in a row gained less than `PLATEAU_GAIN` recall (a lossy code's ceiling: going on to
  nlist only costs time).

The sample and what counts:

- queries are `sample_queries` vectors drawn (seeded) from the collection; each is held out of its
  own answer: the index and the exact scan are both asked for k + 1 and the query's own id is
  dropped, so a query does not count finding itself (which IVF always does: its own list is probed);
- the ground truth is an exact inner-product scan over the raw vectors;
- recall@k counts a returned id as a hit when its exact score reaches the k-th true score, so ties
  (duplicate images) do not count as misses whichever duplicate the index returns.

A value meets the target when the recall measured on the sample is above it by a margin: the lower
end of a one-sided confidence interval, recall - z * sqrt(recall * (1 - recall) / (k * queries)) with
z = `CONFIDENCE_Z` (1.28: 90%), must reach the target, so that a value that only just met it on
this sample does not run below it on new queries half the time.

Latency is single-query, one thread (how a Searcher replica runs a request), p50 and p99 over the
first `LATENCY_QUERIES` queries of the sample, at the chosen value only. When the target cannot be
met (a lossy PQ code bounds recall, or the knob is at its maximum), the result says so (`met`
False) with the best value found: it is never reported as meeting a target it missed. An exact Flat
index needs no knob: recall 1.0 by construction, measured anyway.

The result (`TuningResult`) is plain data for the version file and /info: `to_dict` / `from_dict`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from image_search.faiss_index import raise_quantizer_ef_search
from image_search.index_spec import IndexSpec

DEFAULT_K = 10
DEFAULT_SAMPLE_QUERIES = 500  # standard error of recall ~0.003 at 0.95 with k=10
SAMPLE_SEED = 0
MAX_EF_SEARCH = 4096
SCORE_TOLERANCE = 1e-5  # float32 inner products of unit vectors: ties within rounding count as ties
SEARCH_BATCH = 4096
CONFIDENCE_Z = 1.28  # one-sided 90%
LATENCY_QUERIES = 200  # single-query timings at the chosen value (p99 of 200: the 2nd slowest)
LADDER_RATIO = 1.1  # bisection stops once the first value meeting the target is within 10% of one missing it
PLATEAU_GAIN = 0.002  # two doublings each gaining less recall than this: a ceiling, stop searching


@dataclass(frozen=True)
class TuningResult:
    param: str | None  # "nprobe", "ef_search" or None (an exact index: nothing to tune)
    value: int | None  # the chosen value of `param`
    recall: float  # measured recall@k at `value`, on the held-out sample
    lower_bound: float  # recall minus the confidence margin: what `met` compares with the target
    target: float
    met: bool  # lower_bound >= target; False: `value` is the best found, still short of the target
    k: int
    queries: int
    p50_ms: float  # single-query latency at `value`, one thread
    p99_ms: float
    tried: dict[int, float] = field(default_factory=dict)  # value -> recall, in the order searched

    def params(self) -> dict[str, int]:
        """Search params for IndexSpec.params / apply_search_params."""
        return {} if self.param is None or self.value is None else {self.param: self.value}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tried"] = [[value, recall] for value, recall in self.tried.items()]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuningResult:
        return cls(
            param=data["param"],
            value=None if data["value"] is None else int(data["value"]),
            recall=float(data["recall"]),
            lower_bound=float(data["lower_bound"]),
            target=float(data["target"]),
            met=bool(data["met"]),
            k=int(data["k"]),
            queries=int(data["queries"]),
            p50_ms=float(data["p50_ms"]),
            p99_ms=float(data["p99_ms"]),
            tried={int(value): float(recall) for value, recall in data.get("tried", [])},
        )


def search_knob(index: faiss.Index) -> tuple[str | None, int]:
    """("nprobe", nlist) for IVF, ("ef_search", MAX_EF_SEARCH) for HNSW, (None, 0) for an exact index."""
    try:
        return "nprobe", int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        pass
    inner = faiss.downcast_index(index)
    while isinstance(inner, faiss.IndexIDMap | faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        return "ef_search", MAX_EF_SEARCH
    if isinstance(inner, faiss.IndexFlat):
        return None, 0
    raise ValueError(f"no known search knob on {type(inner).__name__}")


def set_knob(index: faiss.Index, param: str, value: int) -> None:
    """Set nprobe / efSearch through any IDMap or pre-transform wrapper."""
    name = {"nprobe": "nprobe", "ef_search": "efSearch"}[param]
    faiss.ParameterSpace().set_index_parameter(index, name, value)
    if param == "nprobe":
        raise_quantizer_ef_search(index, value)


class HeldOutSample:
    """Queries drawn from the collection, each with its exact top-k among the other vectors."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, k: int, count: int, seed: int = SAMPLE_SEED) -> None:
        if len(vectors) <= k:
            raise ValueError(f"recall@{k} needs more than {k} vectors, not {len(vectors)}")
        self.k = k
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        rows = np.sort(np.random.default_rng(seed).choice(len(vectors), min(count, len(vectors)), replace=False))
        self.queries = self.vectors[rows]
        self.query_ids = self.ids[rows]
        scores, positions = faiss.knn(self.queries, self.vectors, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
        # The k-th best score among the *other* vectors: drop each query's own row.
        own = positions == rows[:, None]
        others = np.where(own.any(axis=1, keepdims=True), ~own, np.arange(k + 1)[None, :] < k)
        self.kth_score = np.array([row[mask][k - 1] for row, mask in zip(scores, others, strict=True)])
        # Rows (positions in `vectors`) of each query's exact top k among the others: (queries, k).
        self.neighbour_rows = np.stack([row[mask][:k] for row, mask in zip(positions, others, strict=True)])
        self._order = np.argsort(self.ids)

    def recall(self, found_ids: np.ndarray) -> float:
        """Tie-aware recall@k of `found_ids` (len(queries) x (k + 1), the index's answers, -1 = none)."""
        hits = 0
        sorted_ids = self.ids[self._order]
        for query, own_id, kth, row in zip(self.queries, self.query_ids, self.kth_score, found_ids, strict=True):
            others = [found for found in row.tolist() if found != own_id and found >= 0][: self.k]
            if not others:
                continue
            positions = self._order[np.searchsorted(sorted_ids, others)]
            scores = self.vectors[positions] @ query
            hits += int(np.count_nonzero(scores >= kth - SCORE_TOLERANCE))
        return hits / (self.k * len(self.queries))


class IvfFlatCurve:
    """Recall@k of an IVF-Flat index (flat coarse quantiser) at every nprobe, from centroid ranks alone.

    hits(p) = the true neighbours whose list is among their query's p nearest centroids: exactly what
    an IVF-Flat search at nprobe p finds of the exact top k (scores inside probed lists are exact).
    """

    def __init__(self, index: faiss.Index, sample: HeldOutSample) -> None:
        ivf = faiss.extract_index_ivf(index)
        self.nlist = int(ivf.nlist)
        centroids = np.asarray(ivf.quantizer.reconstruct_n(0, self.nlist), dtype=np.float32)
        # Each true neighbour's list: its nearest centroid, as IndexIVF::add assigned it.
        neighbours = sample.vectors[sample.neighbour_rows.reshape(-1)]
        _, lists = ivf.quantizer.search(neighbours, 1)
        lists = lists.reshape(sample.neighbour_rows.shape)
        # Rank of every list for every query (0 = probed first), as the coarse search orders them.
        _, order = faiss.knn(sample.queries, centroids, self.nlist, metric=faiss.METRIC_INNER_PRODUCT)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(self.nlist)[None, :], axis=1)
        ranks = np.take_along_axis(rank, lists, axis=1).reshape(-1)
        # hits[p] = neighbours whose list rank is below p, for p = 0..nlist.
        self.hits = np.concatenate([[0], np.cumsum(np.bincount(ranks, minlength=self.nlist))])
        self.possible = int(ranks.size)

    def recall(self, nprobe: int) -> float:
        return float(self.hits[min(max(nprobe, 0), self.nlist)]) / self.possible

    def smallest_meeting(self, target: float) -> int | None:
        """The smallest nprobe whose recall's lower bound reaches `target` on the curve; None: none does."""
        for nprobe in range(1, self.nlist + 1):
            if recall_lower_bound(self.recall(nprobe), self.possible) >= target:
                return nprobe
        return None


def is_ivf_flat(index: faiss.Index) -> bool:
    """IVF with Flat codes and a flat coarse quantiser, under an IDMap: where IvfFlatCurve is exact."""
    inner = faiss.downcast_index(index)
    while isinstance(inner, faiss.IndexIDMap):
        inner = faiss.downcast_index(inner.index)
    return isinstance(inner, faiss.IndexIVFFlat) and isinstance(faiss.downcast_index(inner.quantizer), faiss.IndexFlat)


def _recall_at(index: faiss.Index, sample: HeldOutSample) -> float:
    found = np.empty((len(sample.queries), sample.k + 1), dtype=np.int64)
    for start in range(0, len(sample.queries), SEARCH_BATCH):
        _, found[start : start + SEARCH_BATCH] = index.search(
            sample.queries[start : start + SEARCH_BATCH], sample.k + 1
        )
    return sample.recall(found)


def single_query_latency_ms(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[float, float]:
    """(p50, p99) ms of one query per call on one thread, as a Searcher replica runs a request."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        seconds = []
        for row in range(len(queries)):
            started = time.perf_counter()
            index.search(queries[row : row + 1], k)
            seconds.append(time.perf_counter() - started)
    finally:
        faiss.omp_set_num_threads(threads)
    return 1000 * float(np.percentile(seconds, 50)), 1000 * float(np.percentile(seconds, 99))


def recall_lower_bound(recall: float, hits_possible: int, z: float = CONFIDENCE_Z) -> float:
    """The one-sided lower confidence bound of a recall measured over `hits_possible` (k x queries)."""
    return recall - z * float(np.sqrt(max(recall * (1 - recall), 0.0) / hits_possible))


def smallest_meeting(
    measure: Callable[[int], float],
    low: int,
    high: int,
    target: float,
    ratio: float = 1.0,
    plateau: float = 0.0,
) -> tuple[int, bool]:
    """The smallest value in [low, high] with measure(value) >= target, taking measure as rising:
    doubling from `low`, then bisection until the value met is within `ratio` of one missed (1.0: the
    exact smallest). (value, met); not met: (high, False), or (the last value tried, False) once two
    doublings in a row each raised measure by less than `plateau` (0: never stop early)."""
    value, below = low, low - 1
    gains: list[float] = []
    previous: float | None = None
    while (current := measure(value)) < target:
        if value >= high:
            return high, False
        if previous is not None:
            gains.append(current - previous)
            if plateau > 0 and len(gains) >= 2 and max(gains[-2:]) < plateau:
                return value, False
        previous = current
        below, value = value, min(2 * value, high)
    # measure(below) < target <= measure(value) (below = low - 1: nothing below low): bisect.
    while value - below > 1 and value > ratio * max(below, 1):
        middle = (below + value) // 2
        if measure(middle) >= target:
            value = middle
        else:
            below = middle
    return value, True


def tune_recall(
    index: faiss.Index,
    vectors: np.ndarray,
    ids: np.ndarray | None = None,
    *,
    target: float,
    k: int = DEFAULT_K,
    sample_queries: int = DEFAULT_SAMPLE_QUERIES,
    seed: int = SAMPLE_SEED,
) -> TuningResult:
    """Tune `index` (built from `vectors` under `ids`, default 0..n-1) to recall@k >= target.

    Leaves the index set to the chosen value; the result's params() record it.
    """
    if not 0 < target <= 1:
        raise ValueError(f"the recall target is a fraction in (0, 1], not {target}")
    ids = np.arange(len(vectors), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    sample = HeldOutSample(vectors, ids, k, sample_queries, seed)
    count = len(sample.queries)
    param, high = search_knob(index)
    tried: dict[int, float] = {}
    if param is None:
        recall = _recall_at(index, sample)
        bound = recall_lower_bound(recall, k * count)
        p50, p99 = single_query_latency_ms(index, sample.queries[:LATENCY_QUERIES], k)
        return TuningResult(None, None, recall, bound, target, bound >= target, k, count, p50, p99, tried)

    def measure(value: int) -> float:
        if value not in tried:
            set_knob(index, param, value)
            tried[value] = _recall_at(index, sample)
        return recall_lower_bound(tried[value], k * count)

    low = 1 if param == "nprobe" else k
    high = max(low, high)
    value, met = _from_curve(index, sample, measure, target) if is_ivf_flat(index) else (None, False)
    if value is None:
        value, met = smallest_meeting(measure, low, high, target, LADDER_RATIO, PLATEAU_GAIN)
    if not met:  # the best recall seen, at the smallest value reaching it
        best = max(tried.values())
        value = min(v for v, recall in tried.items() if recall == best)
    set_knob(index, param, value)
    p50, p99 = single_query_latency_ms(index, sample.queries[:LATENCY_QUERIES], k)
    bound = recall_lower_bound(tried[value], k * count)
    return TuningResult(param, value, tried[value], bound, target, met, k, count, p50, p99, tried)


def _from_curve(
    index: faiss.Index, sample: HeldOutSample, measure: Callable[[int], float], target: float
) -> tuple[int | None, bool]:
    """IVF-Flat: the curve's smallest nprobe, confirmed by real searches at it and one below.

    (value, True) when both confirm it; (None, False) when they do not (the ladder search decides)."""
    curve = IvfFlatCurve(index, sample)
    value = curve.smallest_meeting(target)
    if value is None:  # not even at nlist: measure there once, it is the best there is
        measure(curve.nlist)
        return None, False
    if measure(value) >= target and (value == 1 or measure(value - 1) < target):
        return value, True
    return None, False


def with_tuned_params(spec: IndexSpec, result: TuningResult) -> IndexSpec:
    """`spec` with the tuned knob in its params (what the version file records and Searchers apply)."""
    params = {name: value for name, value in spec.params.items() if name not in ("nprobe", "ef_search")}
    return IndexSpec(spec.factory, {**params, **result.params()}, reason=spec.reason)
