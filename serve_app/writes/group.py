"""Group commit: writes that arrive while a commit runs are committed together by the next one.

Every caller awaits its own future; one runner task takes everything queued (up to `max_ops`
operations), runs the blocking commit on a thread, and hands each caller its slice of the
outcomes. So under load the number of commits follows the commit time, not the number of
writers, and a lone write is committed at once (no waiting for company).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from serve_app.writes.commit import CommitResult
from serve_app.writes.plan import Op, Outcome

logger = logging.getLogger("ray.serve")

# Maintenance (pruning lists the index's versions; compaction may merge segments) runs between
# batches at most this often, so it does not take a share of every commit.
MAINTAIN_INTERVAL_S = 5.0


@dataclass
class _Waiting:
    ops: Sequence[Op]
    future: asyncio.Future[tuple[list[Outcome], str]]


class GroupCommit:
    def __init__(
        self,
        commit: Callable[[list[Op]], CommitResult],
        max_ops: int,
        between: Callable[[], None] | None = None,
    ) -> None:
        self.commit = commit
        self.max_ops = max_ops
        self.between = between  # maintenance run after each batch is answered (compaction, pruning)
        self.queue: list[_Waiting] = []
        self.runner: asyncio.Task[None] | None = None
        self.batches = 0
        self.maintained_at = time.monotonic()

    async def submit(self, ops: Sequence[Op]) -> tuple[list[Outcome], str]:
        """The outcomes of `ops` (in order) and the version holding them, once committed."""
        future: asyncio.Future[tuple[list[Outcome], str]] = asyncio.get_running_loop().create_future()
        self.queue.append(_Waiting(ops, future))
        if self.runner is None or self.runner.done():
            self.runner = asyncio.get_running_loop().create_task(self._run())
        return await future

    def _take(self) -> list[_Waiting]:
        taken: list[_Waiting] = []
        count = 0
        while self.queue and (not taken or count + len(self.queue[0].ops) <= self.max_ops):
            item = self.queue.pop(0)
            taken.append(item)
            count += len(item.ops)
        return taken

    async def _run(self) -> None:
        while self.queue:
            batch = self._take()
            ops = [op for item in batch for op in item.ops]
            try:
                result = await asyncio.to_thread(self.commit, ops)
            except Exception as exc:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self.batches += 1
            start = 0
            for item in batch:
                if not item.future.done():  # a caller that went away (cancelled) needs no answer
                    item.future.set_result((result.outcomes[start : start + len(item.ops)], result.version))
                start += len(item.ops)
            if self.between is not None and time.monotonic() - self.maintained_at >= MAINTAIN_INTERVAL_S:
                self.maintained_at = time.monotonic()
                try:
                    await asyncio.to_thread(self.between)
                except Exception as exc:  # maintenance is retried after the next batch
                    logger.warning("write maintenance (compaction, pruning) failed: %s", exc)
