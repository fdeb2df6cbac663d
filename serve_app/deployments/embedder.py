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
from image_search.errors import TextSearchUnavailable
from image_search.text_encoder import ClipTextEncoder, TextTowerUnavailable
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
        self._init_text(model, options)
        logger.info(
            "Embedder ready: %s on %s, %s, %d threads",
            model,
            self.encoder.device,
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
        if self.text_coalescer is not None:
            self.text_coalescer.max_batch_size = config.max_text_batch_size

    def identity(self) -> dict[str, Any]:
        identity = self.encoder.identity
        return {"model": identity.name, "embedding_dim": identity.embedding_dim, "fingerprint": identity.fingerprint}

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

    # --- text queries: their own encoder, queue and forward passes --------------------------------

    def _init_text(self, model: str, options: EmbedderOptions) -> None:
        """Load the text tower when the checkpoint has one; without it image search still works."""
        self.text_encoder: ClipTextEncoder | None = None
        self.text_coalescer: ForwardCoalescer | None = None
        self.text_batch_sizes: Counter[int] = Counter()
        self.text_unavailable_reason = ""
        try:
            self.text_encoder = ClipTextEncoder(model, device=options.device, precision=options.precision)
        except TextTowerUnavailable as exc:
            self.text_unavailable_reason = str(exc)
            logger.warning("text search is off: %s", exc)
            return
        # A separate coalescer, so a burst of texts never waits behind a full image batch (and the
        # reverse): its own queue, and its own model thread running beside the image one.
        self.text_coalescer = ForwardCoalescer(
            self.text_encoder.encode_rows, BatchingConfig().max_text_batch_size, observe=self._observe_text_forward
        )

    def text_search(self) -> dict[str, Any]:
        """Whether this checkpoint embeds text, and the token limit it reads (for /info)."""
        encoder = self.text_encoder
        return {"available": encoder is not None, "max_tokens": encoder.max_tokens if encoder is not None else None}

    async def embed_text(self, text: str) -> dict[str, Any]:
        """One query text in (already checked by the Ingress), its unit vector and whether it was truncated out.

        Tokenising is cheap and runs here, per request; the forward pass is shared with the texts
        of other requests queued meanwhile.
        """
        if self.text_encoder is None or self.text_coalescer is None:
            raise TextSearchUnavailable("Search by text is not available: the model has no text encoder.")
        tokens = self.text_encoder.tokenize(text)
        vectors = await self.text_coalescer.run([self.text_encoder.token_row(tokens)])
        return {"vector": vectors[0], "truncated": tokens.truncated}

    def text_batch_size_counts(self) -> dict[int, int]:
        """How many text forward passes of each batch size this replica ran."""
        return dict(self.text_batch_sizes)

    def _observe_text_forward(self, size: int, seconds: float) -> None:
        self.text_batch_sizes[size] += 1
        self.metrics.observe_text_batch(size, seconds)

    def _observe_forward(self, size: int, seconds: float) -> None:
        self.batch_sizes[size] += 1
        self.metrics.observe_batch(size, seconds)

    def check_health(self) -> None:
        if self.encoder.model is None:
            raise RuntimeError("the model is not loaded")
