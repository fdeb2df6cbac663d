"""Assembling `results`: request order, per-query errors, FAISS padding."""

from __future__ import annotations

import numpy as np
import pytest

from image_search.errors import CorruptImage, FileTooLarge
from image_search.manifest import ImageRecord, Manifest
from serve_app.results import Query, error_entries, result_entries
from tests.support import sample_manifest


def manifest(count: int) -> Manifest:
    records = tuple(ImageRecord(id=i, key=f"dir/img{i}.jpg", size=1, sha256=f"{i:064x}") for i in range(count))
    return sample_manifest(records, embedding_dim=2)


def test_answered_and_refused_queries_keep_request_order() -> None:
    queries = [
        Query("filename", "a.jpg"),
        Query("filename", "bad.jpg", CorruptImage("broken", "bad.jpg")),
        Query("text", "a red bicycle", extra={"truncated": True}),
    ]
    scores = np.array([[0.9, 0.5], [0.8, 0.1]], dtype=np.float32)
    ids = np.array([[1, 0], [2, -1]])
    entries = result_entries(queries, scores, ids, manifest(3), root_path="/app")
    assert [next(iter(entry)) for entry in entries] == ["filename", "filename", "text"]
    assert [m["id"] for m in entries[0]["matches"]] == [1, 0]
    assert entries[0]["matches"][0]["url"] == "/app/images/1"
    assert entries[1]["error"]["code"] == "corrupt_image"
    assert entries[2]["truncated"] is True
    assert [m["id"] for m in entries[2]["matches"]] == [2]  # FAISS's -1 padding is dropped


def test_rows_must_match_the_answered_queries() -> None:
    with pytest.raises(ValueError, match="FAISS rows"):
        result_entries([Query("filename", "a.jpg")], np.zeros((2, 1)), np.zeros((2, 1), dtype=int), manifest(1))


def test_when_every_query_failed_each_error_is_listed() -> None:
    queries = [
        Query("filename", "big.png", FileTooLarge("too large", "big.png")),
        Query("filename", "bad.jpg", CorruptImage("broken", "bad.jpg")),
    ]
    assert [entry["error"]["code"] for entry in error_entries(queries)] == ["file_too_large", "corrupt_image"]
