"""Embedder deployment: a thin Serve wrapper around ClipImageEncoder with dynamic batching."""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any

import numpy as np
import torch
from ray import serve

from image_search.encoder import ClipImageEncoder
from serve_app.coalescing import ForwardCoalescer
from serve_app.config import BatchingConfig, EmbedderOptions
from serve_app.metrics import EmbedderMetrics

logger = logging.getLogger("ray.serve")

DEFAULT_BATCHING = BatchingConfig()
# Formed batches are handed to the ForwardCoalescer, which serialises the model work, so Serve's
# gate on batches in flight must never close before max_ongoing_requests does (each batch holds at
# least one request); see serve_app/coalescing.py for why it must not gate.
BATCHES_IN_FLIGHT = 1024


class DropBatchCapacityWarning(logging.Filter):
    """Drops Serve's warning that max_batch_size * max_concurrent_batches exceeds max_ongoing_requests.

    It assumes each formed batch is a forward pass; here formed batches are merged, so it would
    mislead operators on every start and reconfigure.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_concurrent_batches" not in record.getMessage()


def configure_torch_threads(requested: int | None) -> int:
    """Pin torch's intra-op threads: Ray sets OMP_NUM_THREADS to the replica's CPU share."""
    threads = requested or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads


def split_valid(batch: list[Any], shape: tuple[int, ...]) -> tuple[list[int], list[np.ndarray]]:
    """Positions and arrays of the items that are uint8 crops of the expected shape."""
    positions, arrays = [], []
    for position, item in enumerate(batch):
        if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.shape == shape:
            positions.append(position)
            arrays.append(item)
    return positions, arrays


@serve.deployment(
    name="Embedder",
    # Batches never exceed max_ongoing_requests, so it must stay >= max_batch_size.
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 1},
    user_config=DEFAULT_BATCHING.model_dump(),
    health_check_period_s=10,
    # A replica that cannot load its model or index will not do better on the 20th try.
    max_constructor_retry_count=3,
)
class Embedder:
    def __init__(self, model: str, options: EmbedderOptions) -> None:
        self.threads = configure_torch_threads(options.num_threads)
        self.encoder = ClipImageEncoder(model, device=options.device, precision=options.precision)
        spec = self.encoder.spec
        self.input_shape = (spec.crop_height, spec.crop_width, 3)
        self.batch_sizes: Counter[int] = Counter()
        self.metrics = EmbedderMetrics()
        self.coalescer = ForwardCoalescer(
            self.encoder.encode_pixels, DEFAULT_BATCHING.max_batch_size, observe=self._observe_forward
        )
        logger.addFilter(DropBatchCapacityWarning())
        logger.info(
            "Embedder ready: %s on %s, precision %s (asked: %s), %d threads",
            model,
            self.encoder.device,
            self.encoder.precision,
            options.precision,
            self.threads,
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        config = BatchingConfig(**user_config)
        # @serve.batch adds these setters to the method; type checkers cannot see them.
        batched: Any = self.embed
        batched.set_max_batch_size(config.max_batch_size)
        batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.coalescer.max_batch_size = config.max_batch_size

    def identity(self) -> dict[str, Any]:
        identity = self.encoder.identity
        return {
            "model": identity.name,
            "embedding_dim": identity.embedding_dim,
            "fingerprint": identity.fingerprint,
            # What runs ("auto" resolved on this replica's hardware), for /info.
            "precision": self.encoder.precision,
        }

    def batch_size_counts(self) -> dict[int, int]:
        """How many forward passes of each batch size this replica ran (tests and operators observe batching here)."""
        return dict(self.batch_sizes)

    def replica_pid(self) -> int:
        """The replica's process id, for operators (and fault tests) that need to find it."""
        return os.getpid()

    def input_spec(self) -> dict[str, Any]:
        return self.encoder.spec.to_dict()

    @serve.batch(
        max_batch_size=DEFAULT_BATCHING.max_batch_size,
        batch_wait_timeout_s=DEFAULT_BATCHING.batch_wait_timeout_s,
        max_concurrent_batches=BATCHES_IN_FLIGHT,
    )
    async def embed(self, batch: list[np.ndarray]) -> list[np.ndarray | None]:
        """One uint8 crop per request in, its unit vector out (None for a malformed item).

        An exception here would fail every request in the batch, so bad items are answered
        individually. The forward pass runs on the coalescer's model thread, so the replica keeps
        accepting requests meanwhile, and they join the next forward pass.
        """
        positions, arrays = split_valid(batch, self.input_shape)
        results: list[np.ndarray | None] = [None] * len(batch)
        if arrays:
            vectors = await self.coalescer.run(arrays)
            for position, vector in zip(positions, vectors, strict=True):
                results[position] = vector
        return results

    def _observe_forward(self, size: int, seconds: float) -> None:
        self.batch_sizes[size] += 1
        self.metrics.observe_batch(size, seconds)

    def check_health(self) -> None:
        if self.encoder.model is None:
            raise RuntimeError("the model is not loaded")
