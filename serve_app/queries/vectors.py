"""The body of `POST /search/vectors`: JSON `{"vectors": [[...], ...], "k": 5}`, checked before any search.

Vectors are L2-normalised here (scores are cosines, as for photos and texts), so a zero vector has
no direction and is refused; so are non-finite values and a wrong dimension. The byte limit follows
from `max_queries` and the dimension: a float printed by any JSON encoder takes at most ~25
characters, so anything larger is not a vector request.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from image_search.errors import InvalidJson, InvalidK, InvalidVectors, RequestTooLarge, TooManyQueries

MAX_CHARS_PER_NUMBER = 32  # "-1.2345678901234567e-308, " is 26
BODY_SLACK_BYTES = 4096  # brackets, "k", whitespace
MIN_NORM = 1e-12


@dataclass(frozen=True)
class VectorQuery:
    vectors: np.ndarray  # (n, dim) unit float32
    k: int


def vector_body_limit(max_queries: int, dim: int) -> int:
    """The most bytes a body of `max_queries` vectors of `dim` numbers needs."""
    return max_queries * dim * MAX_CHARS_PER_NUMBER + BODY_SLACK_BYTES


def parse_vector_body(body: bytes, dim: int, max_queries: int, default_k: int, max_k: int) -> VectorQuery:
    if len(body) > vector_body_limit(max_queries, dim):
        raise RequestTooLarge(f"A vector search body may carry at most {vector_body_limit(max_queries, dim)} bytes.")
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidJson('Send a JSON object: {"vectors": [[...], ...], "k": 5}.') from None
    if not isinstance(data, dict) or not isinstance(data.get("vectors"), list):
        raise InvalidJson('Send a JSON object with a "vectors" list: {"vectors": [[...], ...], "k": 5}.')
    unknown = sorted(set(data) - {"vectors", "k"})
    if unknown:
        raise InvalidJson(f'Unknown fields {unknown[:5]}: a vector search takes "vectors" and "k".')
    k = parse_json_k(data.get("k"), default_k, max_k)
    rows = data["vectors"]
    if not rows:
        raise InvalidVectors("Send at least one vector.")
    if len(rows) > max_queries:
        raise TooManyQueries(f"Send at most {max_queries} vectors per request; got {len(rows)}.")
    vectors = np.empty((len(rows), dim), dtype=np.float32)
    for position, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != dim:
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise InvalidVectors(f"Vector {position} must be a list of {dim} numbers; got {got}.")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in row):
            raise InvalidVectors(f"Vector {position} holds a value that is not a finite number.")
        vector = np.asarray(row, dtype=np.float64)
        largest = float(np.abs(vector).max())
        if largest < MIN_NORM:
            raise InvalidVectors(f"Vector {position} has no direction (its length is zero).")
        vector /= largest  # scaled first: 1e308-sized values cannot overflow the norm
        vectors[position] = vector / np.linalg.norm(vector)
    return VectorQuery(vectors, k)


def parse_json_k(raw: object, default_k: int, max_k: int) -> int:
    if raw is None:
        return default_k
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise InvalidK(f"k must be a whole number from 1 to {max_k}.")
    if not 1 <= raw <= max_k:
        raise InvalidK(f"k must be from 1 to {max_k}; got {raw}.")
    return raw
