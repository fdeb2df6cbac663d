"""The Embedder's plain logic, without Ray: which items are crops, and batch sizes it can reach."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.config import check_batch_fits_concurrency
from serve_app.deployments.embedder import is_crop


def test_only_uint8_crops_of_the_expected_shape_are_crops() -> None:
    good = np.zeros((4, 4, 3), dtype=np.uint8)
    assert is_crop(good, (4, 4, 3))
    assert not is_crop(np.zeros((4, 4, 3), dtype=np.float32), (4, 4, 3))
    assert not is_crop(np.zeros((5, 4, 3), dtype=np.uint8), (4, 4, 3))
    assert not is_crop("pixels", (4, 4, 3))


@pytest.mark.parametrize(("batch", "ongoing"), [(16, 64), (64, 64), (1, 1), (256, None)])
def test_batch_sizes_the_replica_can_reach_are_accepted(batch: int, ongoing: int | None) -> None:
    check_batch_fits_concurrency(batch, ongoing)


def test_a_batch_size_above_max_ongoing_requests_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"max_batch_size \(65\) is larger than its max_ongoing_requests \(64\)"):
        check_batch_fits_concurrency(65, 64)
