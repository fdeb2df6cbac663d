"""Embedder deployment: a thin Serve wrapper around ClipImageEncoder with dynamic batching.

Batching is the ForwardCoalescer alone (serve_app/coalescing.py says why not `@serve.batch`):
each request submits its crop, and what queues while a forward pass runs becomes the next one.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any

import numpy as np
import torch
from ray import serve

from image_search.checkpoints import is_demo_checkpoint, model_display_name
from image_search.encoder import ClipImageEncoder
from serve_app.coalescing import ForwardCoalescer
from serve_app.config import BatchingConfig, EmbedderOptions, check_batch_fits_concurrency
from serve_app.metrics import EmbedderMetrics

logger = logging.getLogger("ray.serve")

DEFAULT_BATCHING = BatchingConfig()


def configure_torch_threads(requested: int | None) -> int:
    """Pin torch's intra-op threads: Ray sets OMP_NUM_THREADS to the replica's CPU share."""
    threads = requested or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads


def is_crop(item: Any, shape: tuple[int, ...]) -> bool:
    """Whether a request item is a uint8 crop of the shape the model takes."""
    return isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.shape == shape


def replica_max_ongoing_requests() -> int | None:
    """This replica's `max_ongoing_requests`, or None outside a replica.

    Ray 2.60 has no public accessor for a replica's own deployment config; the replica context
    carries it as `_deployment_config`, read here (and only here) to refuse a batch size that the
    replica could never reach.
    """
    try:
        context = serve.get_replica_context()
    except RuntimeError:
        return None
    config = getattr(context, "_deployment_config", None)
    value = getattr(config, "max_ongoing_requests", None)
    return int(value) if value is not None else None


@serve.deployment(
    name="Embedder",
    # A batch can only hold requests in flight, so this must stay >= max_batch_size (checked in reconfigure).
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
        self.demo = is_demo_checkpoint(model)
        spec = self.encoder.spec
        self.input_shape = (spec.crop_height, spec.crop_width, 3)
        self.batch_sizes: Counter[int] = Counter()
        self.metrics = EmbedderMetrics()
        self.coalescer = ForwardCoalescer(
            self.encoder.encode_pixels, DEFAULT_BATCHING.max_batch_size, observe=self._observe_forward
        )
        logger.info(
            "Embedder ready: %s on %s, %s, %d threads",
            model,
            self.encoder.device,
            options.precision,
            self.threads,
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        config = BatchingConfig(**user_config)
        check_batch_fits_concurrency(config.max_batch_size, replica_max_ongoing_requests())
        self.coalescer.max_batch_size = config.max_batch_size
        self.coalescer.batch_wait_timeout_s = config.batch_wait_timeout_s

    def identity(self) -> dict[str, Any]:
        """What the Ingress checks an index against, and shows on /info."""
        identity = self.encoder.identity
        return {
            "model": identity.name,
            "name": model_display_name(identity.name),
            "embedding_dim": identity.embedding_dim,
            "fingerprint": identity.fingerprint,
            "preprocessing": self.encoder.spec.to_dict(),
            "demo": self.demo,
        }

    async def batch_size_counts(self) -> dict[int, int]:
        """How many forward passes of each batch size this replica ran (tests and operators observe batching here).

        Async, so it runs on the event loop that updates the counter, never beside it on a pool thread.
        """
        return dict(self.batch_sizes)

    async def queued_requests(self) -> int:
        """Requests waiting for a forward pass (not counting the one running): how far behind the model is."""
        return self.coalescer.queued()

    def replica_pid(self) -> int:
        """The replica's process id, for operators (and fault tests) that need to find it."""
        return os.getpid()

    async def embed(self, pixels: np.ndarray) -> np.ndarray | None:
        """One uint8 crop in, its unit vector out (None for a malformed item, which the Ingress never sends).

        The forward pass runs on the coalescer's model thread, so the replica keeps accepting
        requests meanwhile, and they join the next forward pass.
        """
        if not is_crop(pixels, self.input_shape):
            return None
        vectors = await self.coalescer.run([pixels])
        return vectors[0]

    def _observe_forward(self, size: int, seconds: float) -> None:
        # Called on the event loop by the coalescer after each forward pass.
        self.batch_sizes[size] += 1
        self.metrics.observe_batch(size, seconds)
