"""The Embedder's plain logic, without Ray: batch item validation and the log filter."""

from __future__ import annotations

import logging

import numpy as np

from serve_app.deployments.embedder import DropBatchCapacityWarning, split_valid


def test_split_valid_keeps_only_crops_of_the_expected_shape() -> None:
    good = np.zeros((4, 4, 3), dtype=np.uint8)
    batch = [good, np.zeros((4, 4, 3), dtype=np.float32), "junk", np.zeros((5, 4, 3), dtype=np.uint8), good]
    positions, arrays = split_valid(batch, (4, 4, 3))
    assert positions == [0, 4] and len(arrays) == 2


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("ray.serve", logging.WARNING, __file__, 1, message, None, None)


def test_only_serves_batch_capacity_warning_is_dropped() -> None:
    drop = DropBatchCapacityWarning()
    serve_warning = (
        "`max_batch_size` (16) * `max_concurrent_batches` (1024) is larger than `max_ongoing_requests` (64)."
    )
    assert not drop.filter(record(serve_warning))
    assert drop.filter(record("Embedder ready"))
    assert drop.filter(record("replica health check failed"))
