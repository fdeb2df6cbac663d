"""Writer deployment: the one process that commits writes to the index (one replica).

Thin: the Ingress validates, crops and embeds each upload, then sends `Put`/`Remove` operations
here; `GroupCommit` (serve_app/writes/group.py) commits what arrives together as one segment plus
deletions through `Committer` (serve_app/writes/commit.py), under the index's commit lock, which CLI
builders take too. At start it reconciles what a killed predecessor left half done (recovery needs
the Embedder only for bytes stored but never committed).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from image_search.artifact import RetentionPolicy
from image_search.commit_lock import holder_name
from image_search.errors import ClientError
from image_search.index_planner import DEFAULT_MAX_INDEX_MEMORY
from image_search.merge_policy import MergePolicy
from image_search.preprocessing import PreprocessSpec, pixels_from_bytes
from image_search.segments import Version
from image_search.storage import Store, open_store
from serve_app.config import AppArgs
from serve_app.downstream import await_with_progress
from serve_app.writes.commit import Committer
from serve_app.writes.errors import WriterBusy
from serve_app.writes.group import GroupCommit
from serve_app.writes.plan import Op, Outcome

logger = logging.getLogger("ray.serve")


def compact_if_due(
    index: Store,
    version: Version,
    max_index_memory: int = DEFAULT_MAX_INDEX_MEMORY,
    retention: RetentionPolicy | None = None,
    before_commit: Callable[[], None] | None = None,
) -> Version | None:
    """The builder's compaction (same merge policy, same publish, same index budget), run between write
    batches; `before_commit` is the Writer's lease check, run right before CURRENT is written."""
    from index_builder.build import compact

    return compact(
        index,
        version,
        retention or RetentionPolicy(),
        MergePolicy(),
        max_index_memory=max_index_memory,
        before_commit=before_commit,
    )


@serve.deployment(
    name="Writer",
    num_replicas=1,  # one committer per index: the commit lock would refuse a second one anyway
    max_ongoing_requests=1024,  # callers wait here to be grouped into one commit
    ray_actor_options={"num_cpus": 0.25},
    max_constructor_retry_count=1000,  # a builder holding the lock at start is waited out
)
class Writer:
    async def __init__(self, embedder: DeploymentHandle, args: AppArgs, index_root: str) -> None:  # type: ignore[misc]
        self.embedder = embedder
        self.args = args
        self.loop = asyncio.get_running_loop()
        identity = await await_with_progress(
            embedder.identity.remote(), args.startup_timeout_s, "the Embedder to load its model and answer"
        )
        self.spec = PreprocessSpec.from_dict(identity["preprocessing"])
        self.index = open_store(index_root)
        self.image_stores: dict[str, Store] = {}
        options = args.writes
        retention = RetentionPolicy(retention_s=options.retention_s)
        self.committer = Committer(
            self.index,
            self._images_for,
            self._embed_blocking,
            holder_name(f"the Writer of {serve.get_replica_context().app_name}"),
            options.lock_wait_s,
            options.lock_lease_s,
            retention=retention,
            max_index_memory=args.max_index_memory,
            after_publish=functools.partial(
                compact_if_due, max_index_memory=args.max_index_memory, retention=retention
            ),
        )
        self.group = GroupCommit(self.committer.commit, options.max_batch_ops, self.committer.maintain)
        try:
            recovered = await asyncio.to_thread(self.committer.recover)
        except WriterBusy as exc:  # a builder writes now: the first commit recovers instead
            logger.warning("Writer start: recovery deferred: %s", exc.message)
        else:
            logger.info("Writer ready (%d pending intent(s) recovered)", recovered)

    def _images_for(self, version: Version) -> Store:
        location = self.args.images or version.source
        store = self.image_stores.get(location)
        if store is None:
            store = self.image_stores[location] = open_store(location)
        return store

    def _embed_blocking(self, items: Sequence[bytes]) -> list[np.ndarray | None]:
        """For recovery, on the commit thread: decode and crop here, embed through the Embedder."""
        vectors: list[np.ndarray | None] = []
        for data in items:
            try:
                pixels = pixels_from_bytes(data, self.spec, None, self.args.limits.max_pixels)
            except ClientError:
                vectors.append(None)
                continue
            call = self.embedder.embed.remote(pixels)
            vectors.append(asyncio.run_coroutine_threadsafe(self._await(call), self.loop).result())
        return vectors

    @staticmethod
    async def _await(call: Any) -> Any:
        return await call

    async def submit(self, ops: list[Op]) -> tuple[list[Outcome], str]:
        """Commit `ops` with whatever else arrives meanwhile; their outcomes and the version holding them."""
        return await self.group.submit(ops)

    async def check_health(self) -> None:
        if self.group.runner is not None and self.group.runner.done() and self.group.runner.exception():
            raise RuntimeError(f"the commit loop failed: {self.group.runner.exception()}")
