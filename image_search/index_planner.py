"""Which FAISS index fits a memory budget: a pure planner over (vector count, dim, budget, recall target).

The rule, least lossy first (a lossless index is chosen whenever the budget holds one):

1. `Flat` (exact scan, recall 1.0, no training) up to `EXACT_SEARCH_LIMIT` vectors: 100k x 512 floats
   is ~200 MB and one query is ~50M multiply-adds, well under 10 ms on one core. A recall target of
   1.0 always asks for `Flat`: only an exact scan guarantees it.
2. `HNSW32` when the graph fits and the index need not be memory-mapped (`mappable=False`). That is
   autofaiss's first choice (`max_index_memory_usage`: "HNSW when it fits"), the fastest search for
   a given recall. It is off by default here: the Searchers map index files so that replicas on one
   node share one copy in the page cache (issue 9), and FAISS reads an HNSW graph into each process.
3. An inverted file `IVF{K}` with K lists by the FAISS guidelines ("Guidelines to choose an index"):
   K ~ 4*sqrt(N) below 1M vectors (flat coarse quantiser), IVF65536_HNSW32 for 1M-10M,
   IVF262144_HNSW32 for 10M-100M, IVF1048576_HNSW32 above (an HNSW coarse quantiser: a flat one
   would cost 4*K*d per query). K is capped so that k-means has `TRAINING_POINTS_PER_LIST` points per
   list (FAISS warns below 39). Its codes, the first that fits:
   `Flat` (4*d bytes a vector, lossless), `SQ8` (d bytes, 8-bit scalar: small loss), then
   `OPQ{m}_{d'},...,PQ{m}x8` (m bytes: product quantisation after a learned rotation to d' = min(d, 4m)
   dimensions, 4 per sub-quantiser as FAISS recommends; lossy, recall bounded by the code: FAISS's
   Deep1B logs show OPQ32 PQ32 at 0.91 recall@10 with nprobe 128).
4. Nothing fits: `IndexDoesNotFit`, naming the budget it would take (raise it, or shard).

The planner does not predict recall from the data: `nprobe` / `efSearch` are tuned after the build on
the collection's own vectors (image_search/recall_tuning.py), which reports whether the target is met.

Memory (`index_memory_bytes`), per vector and fixed, as FAISS 1.15 holds them (CPU, in memory or
mapped; vectors' growth slack while adding is not counted, a written and re-read index has none):

    Flat         n * (4d + idmap)
    HNSW{M}      n * (4d + 8M + 16 + idmap)          2M int32 links at level 0, ~4 above, level + offset
    IVF{K},code  n * (code + 8 + idmap) + quantiser  codes and ids in the inverted lists
                 quantiser: K * (4d + 48)  (+ K * (8*32 + 16) when it is HNSW32; 48: two vectors a list)
    SQ8          code = d,  + 2 * 4d trained ranges
    OPQ..PQ{m}   code = m,  + 256 * 4d' codebooks + 4 * d * d' rotation

`idmap` is the id wrapper the service puts around every index: `IndexIDMap2` keeps an id array (8 B a
vector) and a reverse hash map (measured ~44 B a vector on FAISS 1.15): `IDMAP2_BYTES_PER_VECTOR`.
`IndexIDMap` alone costs 8.

The default budget is a fixed 4 GiB (`DEFAULT_MAX_INDEX_MEMORY`), not a fraction of this machine's
RAM: the plan must be the same wherever the builder runs (a build machine is not the serving node),
and 4 GiB leaves a 16 GB node room for the Embedder's model, Ray's object store and a second
Searcher's private memory. The budget is for the index being planned: a caller planning a version of
many segments gives each its share.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

GiB = 2**30
DEFAULT_MAX_INDEX_MEMORY = 4 * GiB
DEFAULT_RECALL_TARGET = 0.95
EXACT_SEARCH_LIMIT = 100_000

# k-means wants >= ~39 training points per centroid; FAISS warns below that. More buys little:
# centroids from 64 per list gave recall@5 1.0 at 1M vectors (benchmarks/search_at_scale.py)
# while FAISS's own default (up to 256 per list) takes ~4x longer to train.
TRAINING_POINTS_PER_LIST = 64
MIN_IVF_LISTS = 16
# FAISS guideline tiers: (largest vector count, list count) with an HNSW32 coarse quantiser above 1M.
SMALL_IVF_LIMIT = 1_000_000
IVF_LIST_TIERS = ((10_000_000, 65_536), (100_000_000, 262_144))
LARGEST_IVF_LISTS = 1_048_576

HNSW_M = 32
FLOAT_BYTES = 4
ID_BYTES = 8
IDMAP_BYTES_PER_VECTOR = ID_BYTES
IDMAP2_BYTES_PER_VECTOR = ID_BYTES + 48  # id array + reverse hash map (measured ~52 incl. growth slack)
INVERTED_LIST_OVERHEAD_BYTES = 48  # two std::vector headers (codes, ids) per list
HNSW_FIXED_BYTES_PER_VECTOR = 16  # upper-level links (~4 B), level (4 B), offset (8 B)
PQ_CENTROIDS = 256  # 8-bit codes
PQ_MIN_TRAINING_POINTS = 39 * PQ_CENTROIDS  # FAISS's own warning threshold for each sub-quantiser
PQ_SUBQUANTIZERS = (256, 128, 64, 32, 16, 8)  # bytes a vector, largest (least lossy) first
DIMS_PER_SUBQUANTIZER = 4  # OPQ{m}_{4m}: the FAISS guideline's output dimension for PQ{m}
DEFAULT_NPROBE = 32  # a starting point only: recall_tuning replaces it after the build
DEFAULT_EF_SEARCH = 64


class IndexDoesNotFit(ValueError):
    """No index type holds this many vectors in the budget."""


@dataclass(frozen=True)
class IndexPlan:
    factory: str  # a faiss.index_factory string
    kind: str  # "flat" | "hnsw" | "ivf_flat" | "ivf_sq8" | "ivf_pq"
    reason: str  # why this one, in words, with the numbers
    estimated_bytes: int  # index_memory_bytes of this plan
    search_param: str | None  # the knob recall tuning sets: "nprobe", "ef_search" or None (exact)

    @property
    def exact(self) -> bool:
        return self.kind == "flat"

    def initial_params(self) -> dict[str, int]:
        if self.search_param == "nprobe":
            return {"nprobe": DEFAULT_NPROBE}
        if self.search_param == "ef_search":
            return {"ef_search": DEFAULT_EF_SEARCH}
        return {}


BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20}
BYTE_UNITS.update({"g": 10**9, "gb": 10**9, "gib": GiB, "t": 10**12, "tb": 10**12, "tib": 2**40})


def parse_byte_size(text: str | int) -> int:
    """`--max-index-memory` / `max_index_memory`: bytes, or a number with a unit (`512MiB`, `4GiB`, `16GB`)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in BYTE_UNITS:
            raise ValueError(
                f"{text!r} is not a size: write bytes, or a number with KiB, MiB, GiB, TiB (or kB, MB, GB)"
            )
        value = int(float(match.group(1)) * BYTE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"a memory budget must be positive, not {text!r}")
    return value


def human_bytes(count: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def _power_of_two_at_most(value: float) -> int:
    return 2 ** math.floor(math.log2(value)) if value >= 1 else 1


def guideline_list_count(count: int) -> int:
    """The FAISS guideline's list count for `count` vectors (~4*sqrt(N) as a power of two below 1M)."""
    if count <= SMALL_IVF_LIMIT:
        return int(2 ** round(math.log2(max(4 * math.sqrt(count), 1))))
    return next((tier for limit, tier in IVF_LIST_TIERS if count <= limit), LARGEST_IVF_LISTS)


def ivf_list_count(count: int) -> int:
    """Inverted lists for `count` vectors: the guideline, capped so k-means has data for each list."""
    trainable = _power_of_two_at_most(count / TRAINING_POINTS_PER_LIST)
    return int(max(MIN_IVF_LISTS, min(guideline_list_count(count), trainable)))


def uses_hnsw_quantizer(count: int) -> bool:
    return count > SMALL_IVF_LIMIT


def opq_output_dim(dim: int, subquantizers: int) -> int:
    return min(dim, DIMS_PER_SUBQUANTIZER * subquantizers)


def flat_bytes(count: int, dim: int, idmap: int = IDMAP2_BYTES_PER_VECTOR) -> int:
    return count * (FLOAT_BYTES * dim + idmap)


def hnsw_bytes(count: int, dim: int, m: int = HNSW_M, idmap: int = IDMAP2_BYTES_PER_VECTOR) -> int:
    return count * (FLOAT_BYTES * dim + 2 * m * 4 + HNSW_FIXED_BYTES_PER_VECTOR + idmap)


def coarse_quantizer_bytes(lists: int, dim: int, hnsw: bool) -> int:
    per_list = FLOAT_BYTES * dim + INVERTED_LIST_OVERHEAD_BYTES
    if hnsw:
        per_list += 2 * HNSW_M * 4 + HNSW_FIXED_BYTES_PER_VECTOR
    return lists * per_list


def ivf_bytes(count: int, dim: int, lists: int, code: str, hnsw: bool, idmap: int = IDMAP2_BYTES_PER_VECTOR) -> int:
    """An IVF index with `code` "Flat", "SQ8" or "PQ{m}" (with its OPQ rotation)."""
    if code == "Flat":
        code_bytes, trained = FLOAT_BYTES * dim, 0
    elif code == "SQ8":
        code_bytes, trained = dim, 2 * FLOAT_BYTES * dim
    elif code.startswith("PQ"):
        code_bytes = int(code[2:])
        rotated = opq_output_dim(dim, code_bytes)
        trained = PQ_CENTROIDS * FLOAT_BYTES * rotated + FLOAT_BYTES * dim * rotated
    else:
        raise ValueError(f"unknown IVF code {code!r}")
    return count * (code_bytes + ID_BYTES + idmap) + coarse_quantizer_bytes(lists, dim, hnsw) + trained


def ivf_factory(lists: int, hnsw: bool, code: str, dim: int) -> str:
    coarse = f"IVF{lists}" + (f"_HNSW{HNSW_M}" if hnsw else "")
    if code.startswith("PQ"):
        m = int(code[2:])
        return f"OPQ{m}_{opq_output_dim(dim, m)},{coarse},PQ{m}x8"
    return f"{coarse},{code}"


def _check(count: int, dim: int, max_memory_bytes: int, recall_target: float) -> None:
    if count <= 0:
        raise ValueError("an index needs at least one vector")
    if dim <= 0:
        raise ValueError(f"dimension must be positive, not {dim}")
    if max_memory_bytes <= 0:
        raise ValueError(f"the memory budget must be positive, not {max_memory_bytes}")
    if not 0 < recall_target <= 1:
        raise ValueError(f"the recall target is a fraction in (0, 1], not {recall_target}")


def plan_index(
    count: int,
    dim: int,
    max_memory_bytes: int = DEFAULT_MAX_INDEX_MEMORY,
    recall_target: float = DEFAULT_RECALL_TARGET,
    *,
    mappable: bool = True,
    idmap_bytes_per_vector: int = IDMAP2_BYTES_PER_VECTOR,
    exact_limit: int = EXACT_SEARCH_LIMIT,
) -> IndexPlan:
    """The least lossy index of `count` x `dim` vectors within `max_memory_bytes` (see the module doc).

    `exact_limit`: the most vectors planned as an exact Flat scan (a segment of a large collection
    uses a lower one: see index_spec.choose_segment_index_spec)."""
    _check(count, dim, max_memory_bytes, recall_target)
    budget = human_bytes(max_memory_bytes)
    flat = flat_bytes(count, dim, idmap_bytes_per_vector)
    if recall_target >= 1:
        if flat <= max_memory_bytes:
            reason = f"recall target 1.0: only an exact scan guarantees it; {human_bytes(flat)} <= budget {budget}"
            return IndexPlan("Flat", "flat", reason, flat, None)
        raise IndexDoesNotFit(
            f"recall 1.0 needs an exact Flat index: {human_bytes(flat)} for {count} x {dim}, over the budget "
            f"{budget}; raise --max-index-memory to {flat} bytes or lower the recall target"
        )
    if count <= exact_limit and flat <= max_memory_bytes:
        reason = (
            f"exact: {count} <= {exact_limit} vectors scan in milliseconds with recall 1.0 and no "
            f"training; {human_bytes(flat)} <= budget {budget}"
        )
        return IndexPlan("Flat", "flat", reason, flat, None)
    graph = hnsw_bytes(count, dim, idmap=idmap_bytes_per_vector)
    if not mappable and graph <= max_memory_bytes:
        reason = (
            f"graph: HNSW{HNSW_M} fits ({human_bytes(graph)} <= budget {budget}) and need not be memory-mapped, "
            "the fastest search at a given recall (autofaiss's first choice); efSearch is tuned after the build"
        )
        return IndexPlan(f"HNSW{HNSW_M}", "hnsw", reason, graph, "ef_search")
    lists = ivf_list_count(count)
    hnsw = uses_hnsw_quantizer(count)
    tier = "4*sqrt(N) lists below 1M" if not hnsw else f"FAISS guideline for {human_count(count)} vectors"
    if lists < guideline_list_count(count):
        tier += f", capped at {TRAINING_POINTS_PER_LIST} training points a list"
    codes: list[tuple[str, str, str]] = [
        ("Flat", "ivf_flat", "lossless codes (4*d bytes a vector)"),
        ("SQ8", "ivf_sq8", "8-bit scalar codes (d bytes a vector): IVF,Flat is over the budget; small loss"),
    ]
    if count >= PQ_MIN_TRAINING_POINTS:
        codes += [
            (
                f"PQ{m}",
                "ivf_pq",
                f"lossy PQ{m} codes ({m} bytes a vector) after an OPQ rotation: SQ8 is over the budget; "
                "recall is bounded by the code, tuning reports whether the target is met",
            )
            for m in PQ_SUBQUANTIZERS
            if 2 * m <= dim  # at least 2 dimensions per sub-quantiser
        ]
    for code, kind, why in codes:
        needed = ivf_bytes(count, dim, lists, code, hnsw, idmap_bytes_per_vector)
        if needed <= max_memory_bytes:
            factory = ivf_factory(lists, hnsw, code, dim)
            reason = (
                f"{why}; {lists} lists ({tier}); {human_bytes(needed)} <= budget {budget}; "
                f"exact Flat would need {human_bytes(flat)}; nprobe is tuned after the build"
            )
            return IndexPlan(factory, kind, reason, needed, "nprobe")
    smallest = min(ivf_bytes(count, dim, lists, code, hnsw, idmap_bytes_per_vector) for code, _, _ in codes)
    raise IndexDoesNotFit(
        f"no index of {count} x {dim} vectors fits in {budget}: the smallest ({codes[-1][0]} codes) needs "
        f"{human_bytes(smallest)}; raise --max-index-memory to {smallest} bytes or split the collection "
        "into shards"
    )


def human_count(count: int) -> str:
    for suffix, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if count >= size:
            return f"{count / size:g}{suffix}"
    return str(count)


def index_memory_bytes(
    factory: str, count: int, dim: int, idmap_bytes_per_vector: int = IDMAP2_BYTES_PER_VECTOR
) -> int:
    """The formula above for one of the planner's factory strings (benchmarks compare it with FAISS)."""
    if factory == "Flat":
        return flat_bytes(count, dim, idmap_bytes_per_vector)
    if factory.startswith("HNSW"):
        return hnsw_bytes(count, dim, int(factory[4:].split(",")[0]), idmap_bytes_per_vector)
    parts = factory.split(",")
    coarse = next(part for part in parts if part.startswith("IVF"))
    lists = int(coarse[3:].split("_")[0])
    code = parts[-1].removesuffix("x8")
    return ivf_bytes(count, dim, lists, code, "_HNSW" in coarse, idmap_bytes_per_vector)
