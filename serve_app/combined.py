"""Combined queries: several photos and texts, each with a weight, as one query vector.

The query is the L2-normalised weighted sum of the queries' unit embeddings ("this photo + 'at
night' - 'people'"). Pure functions, unit-tested without Ray: parsing the weight fields, and the
weighted sum with its refusals (non-finite weights, all zero, a sum with no direction).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from image_search.errors import InvalidWeights, ZeroQuery

FILE_WEIGHT_FIELD = "file_weight"
TEXT_WEIGHT_FIELD = "text_weight"
DEFAULT_WEIGHT = 1.0
MAX_WEIGHT_CHARS = 32
# A plain decimal number: no "nan", "inf", hex, or Python's "1_000"; float() alone accepts all of those.
WEIGHT_PATTERN = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?")
# Below this length (relative to the largest weight, which is scaled to 1) the sum has no usable
# direction: the queries cancel out, and normalising would amplify rounding noise.
MIN_SUM_NORM = 1e-4


def parse_weight(raw: str, field: str) -> float:
    text = raw.strip()
    if len(text) > MAX_WEIGHT_CHARS or not WEIGHT_PATTERN.fullmatch(text):
        raise InvalidWeights(
            f"Each '{field}' must be a plain decimal number such as 1, -0.5 or 2e-1; got {raw[:40]!r}."
        )
    value = float(text)
    if not math.isfinite(value):
        raise InvalidWeights(f"Each '{field}' must be a finite number; got {raw[:40]!r}.")
    return value


def parse_weights(raw: Sequence[str], count: int, field: str, queries: str) -> list[float]:
    """The weights of `count` queries: none given -> all DEFAULT_WEIGHT; else exactly one per query, in order."""
    if not raw:
        return [DEFAULT_WEIGHT] * count
    if len(raw) != count:
        raise InvalidWeights(
            f"Send one '{field}' per {queries} (in the same order), or none for weight {DEFAULT_WEIGHT:g}; "
            f"got {len(raw)} for {count}."
        )
    return [parse_weight(value, field) for value in raw]


def weighted_sum(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """The unit vector along sum(weight_i * vector_i), or ZeroQuery when it has no direction.

    The weights are first scaled so the largest is +-1: the direction does not change, and huge
    finite weights (1e300) cannot overflow.
    """
    if vectors.ndim != 2 or len(vectors) != len(weights) or len(weights) == 0:
        raise ValueError(f"need one weight per vector: {vectors.shape} vs {len(weights)}")
    scaled = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(scaled)):
        raise InvalidWeights("Weights must be finite numbers.")
    largest = float(np.abs(scaled).max())
    if largest == 0.0:
        raise ZeroQuery("All weights are zero; give at least one query a non-zero weight.")
    total = (scaled / largest) @ vectors.astype(np.float64)
    norm = float(np.linalg.norm(total))
    if not norm >= MIN_SUM_NORM:
        raise ZeroQuery("The weighted queries cancel each other out; change a weight or add a query.")
    return (total / norm).astype(np.float32)


def combined_part(kind: str, name: str, weight: float, truncated: bool = False) -> dict[str, Any]:
    """How a combined result names one of its queries: {"filename" | "text": ..., "weight": ...}."""
    part: dict[str, Any] = {kind: name, "weight": weight}
    if truncated:
        part["truncated"] = True
    return part
