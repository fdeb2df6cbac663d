"""A segment's rows by position: each row's id, and which rows a version still has live.

Every segment index is an IDMap2 around an inner index whose labels are row positions (row i is
the i-th vector added; `id_map[i]` its id). Searching the inner index with a bitmap of live
positions skips dead rows inside the scan at 1 bit a row, and only the k results are mapped to
ids (segment_search.py says why that beats an id selector on the IDMap2).

API: `id_mapped_rows(index) -> (inner, row_ids) | None`; `LiveRows.of(index, deleted) -> LiveRows |
None`; `rows.search(params, queries, k)`; `MISSING_ID`, the id of "no result" (FAISS's -1).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

MISSING_ID = -1


def id_mapped_rows(index: faiss.Index) -> tuple[faiss.Index, np.ndarray] | None:
    """The inner index of an IDMap(2) whose inner labels are row positions, and each row's id."""
    outer = faiss.downcast_index(index)
    if not isinstance(outer, faiss.IndexIDMap | faiss.IndexIDMap2):
        return None
    inner = faiss.downcast_index(outer.index)
    row_ids = faiss.vector_to_array(outer.id_map).astype(np.int64, copy=False)
    if int(inner.ntotal) != len(row_ids):
        return None
    return inner, row_ids


@dataclass(frozen=True)
class LiveRows:
    """A segment's inner index (labels: row positions), each row's id, and a selector of the live rows."""

    inner: faiss.Index
    row_ids: np.ndarray  # int64: the id of each row (the IDMap2's id_map)
    live: np.ndarray  # bool: live[i] says row i is live in this version
    selector: faiss.IDSelector  # IDSelectorBitmap over positions: bit set = live
    bitmap: np.ndarray  # uint8: the memory the selector reads

    @classmethod
    def of(cls, index: faiss.Index, deleted: np.ndarray) -> LiveRows | None:
        """For an IDMap(2) whose inner index labels rows by position; None for any other index."""
        mapped = id_mapped_rows(index)
        if mapped is None:
            return None
        inner, row_ids = mapped
        live = ~np.isin(row_ids, deleted)
        bitmap = np.packbits(live, bitorder="little")
        return cls(inner, row_ids, live, faiss.IDSelectorBitmap(len(row_ids), faiss.swig_ptr(bitmap)), bitmap)

    def search(self, params: faiss.SearchParameters, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`params` (fresh, with the segment's knobs) searched on the inner index, results as ids."""
        params.sel = self.selector
        scores, positions = self.inner.search(queries, k, params=params)
        return scores, np.where(positions >= 0, self.row_ids[np.maximum(positions, 0)], MISSING_ID)
