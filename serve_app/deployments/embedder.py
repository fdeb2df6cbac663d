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
from ray.serve.exceptions import RayServeException

from image_search.checkpoints import is_demo_checkpoint, model_display_name
from image_search.encoder import ClipImageEncoder
from image_search.errors import TextSearchUnavailable
from image_search.text_encoder import ClipTextEncoder, TextTowerUnavailable
from serve_app.coalescing import ForwardCoalescer
from serve_app.config import BatchingConfig, EmbedderOptions, check_batch_fits_concurrency
from serve_app.metrics import EmbedderMetrics
from serve_app.stage_times import Snapshot, StageTimes

logger = logging.getLogger("ray.serve")

DEFAULT_BATCHING = BatchingConfig()
# What /info and the page call a demo checkpoint (random weights): its folder is just "model".
DEMO_MODEL_NAME = "random CLIP (demo)"


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
    except RayServeException:  # not in a replica (what it raises there, with or without ray.init)
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
        # Where an image request's time goes in this replica (benchmarks/served.py reads it).
        self.stages = StageTimes()
        self.coalescer = ForwardCoalescer(
            self.encoder.encode_pixels, DEFAULT_BATCHING.max_batch_size, self._observe_forward, stages=self.stages
        )
        self._init_text(model, options)
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
        check_batch_fits_concurrency(config.max_batch_size, replica_max_ongoing_requests())
        self.coalescer.max_batch_size = config.max_batch_size
        self.coalescer.batch_wait_timeout_s = config.batch_wait_timeout_s
        if self.text_coalescer is not None:
            self.text_coalescer.max_batch_size = config.max_text_batch_size
            self.text_coalescer.batch_wait_timeout_s = config.batch_wait_timeout_s

    def identity(self) -> dict[str, Any]:
        """What the Ingress checks an index against, and shows on /info."""
        identity = self.encoder.identity
        return {
            "model": identity.name,
            "name": DEMO_MODEL_NAME if self.demo else model_display_name(identity.name),
            "embedding_dim": identity.embedding_dim,
            "fingerprint": identity.fingerprint,
            "preprocessing": self.encoder.spec.to_dict(),
            "demo": self.demo,
            # What runs ("auto" resolved on this replica's hardware), for /info.
            "precision": self.encoder.precision,
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
        with self.stages.timed("in replica"):
            vectors = await self.coalescer.run([pixels])
        return vectors[0]

    async def stage_times(self) -> Snapshot:
        """Seconds summed per stage of the image requests so far (serve_app/stage_times.py; async: see above)."""
        return self.stages.snapshot()

    # --- text queries: their own encoder, queue and forward passes --------------------------------

    def _init_text(self, model: str, options: EmbedderOptions) -> None:
        """Load the text tower when the checkpoint has one; without it image search still works."""
        self.text_encoder: ClipTextEncoder | None = None
        self.text_coalescer: ForwardCoalescer | None = None
        self.text_batch_sizes: Counter[int] = Counter()
        try:
            self.text_encoder = ClipTextEncoder(model, device=options.device, precision=options.precision)
        except TextTowerUnavailable as exc:
            # The reason names the checkpoint's location: logged for operators, never sent to clients.
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

    async def text_batch_size_counts(self) -> dict[int, int]:
        """How many text forward passes of each batch size this replica ran (async: see batch_size_counts)."""
        return dict(self.text_batch_sizes)

    def _observe_text_forward(self, size: int, seconds: float) -> None:
        # Called on the event loop by the text coalescer after each forward pass.
        self.text_batch_sizes[size] += 1
        self.metrics.observe_text_batch(size, seconds)

    def _observe_forward(self, size: int, seconds: float) -> None:
        # Called on the event loop by the coalescer after each forward pass.
        self.batch_sizes[size] += 1
        self.metrics.observe_batch(size, seconds)
