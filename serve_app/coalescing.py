"""The Embedder's one batching mechanism: one forward pass at a time, merging what queues behind it.

Why not Ray Serve's `@serve.batch`: in 2.60 it forms the next batch as soon as
`batch_wait_timeout_s` has passed after its first request, even while the previous batch is still
running (`max_concurrent_batches` only gates when a formed batch may start). Under load a busy model
therefore collects a queue of batches of 1-2 requests and runs them one by one: measured on 2
cores with a ViT-B/32, 16 clients got mean batches of 1.2 and half the throughput of batch 32
(benchmarks/served.py). Here every request is submitted on its own, and whatever has queued while
the model was busy, up to `max_batch_size`, becomes the next forward pass. An idle model waits up
to `batch_wait_timeout_s` for company (0: it starts at once); a busy one gets full batches.

Pure asyncio and numpy: tested without Ray.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from serve_app.stage_times import StageTimes

Forward = Callable[[np.ndarray], np.ndarray]
BatchObserver = Callable[[int, float], None]


@dataclass
class _Pending:
    arrays: list[np.ndarray]
    future: asyncio.Future[np.ndarray] = field(repr=False)
    submitted: float = field(default_factory=time.perf_counter)


class ForwardCoalescer:
    """Runs `forward` (blocking, in one dedicated thread) on merged groups of submitted arrays.

    `forward` takes a stacked (n, ...) array and returns n rows. `observe(size, seconds)` is
    called after every forward pass (batch-size metrics). `stages`, when given, sums per
    submission where its time went (serve_app/stage_times.py): `queue` (submitted until its
    forward pass was formed), `to model thread` and `from model thread` (the hand-offs around the
    forward pass), `forward` (the pass itself, counted once per pass).
    """

    def __init__(
        self,
        forward: Forward,
        max_batch_size: int,
        observe: BatchObserver | None = None,
        batch_wait_timeout_s: float = 0.0,
        stages: StageTimes | None = None,
    ) -> None:
        self.forward = forward
        self.stages = stages
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.observe = observe
        self.pending: deque[_Pending] = deque()
        self.arrived = asyncio.Event()
        self.runner: asyncio.Task[None] | None = None
        # Always the same thread: OpenMP keeps one warm thread team per calling thread, and a
        # forward pass hopping between the event loop's pool threads builds and wakes new ones.
        self.model_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")

    async def run(self, arrays: list[np.ndarray]) -> np.ndarray:
        """The forward pass's rows for `arrays`, in order, computed alongside other callers' arrays."""
        if not arrays:
            raise ValueError("nothing to run")
        loop = asyncio.get_running_loop()
        item = _Pending(arrays, loop.create_future())
        self.pending.append(item)
        self.arrived.set()
        if self.runner is None or self.runner.done():
            self.runner = loop.create_task(self._drain())
        return await item.future

    def _take_group(self) -> list[_Pending]:
        """The oldest pending submission plus as many next ones as fit in max_batch_size.

        A submission is never split, so one larger than max_batch_size runs alone.
        """
        group = [self.pending.popleft()]
        size = len(group[0].arrays)
        while self.pending and size + len(self.pending[0].arrays) <= self.max_batch_size:
            item = self.pending.popleft()
            group.append(item)
            size += len(item.arrays)
        return [item for item in group if not item.future.done()]  # callers that gave up

    def queued(self) -> int:
        """Submissions waiting for a forward pass."""
        return len(self.pending)

    def _pending_size(self) -> int:
        return sum(len(item.arrays) for item in self.pending)

    async def _wait_for_company(self) -> None:
        """Before a forward pass, wait up to batch_wait_timeout_s (from now) until a full batch is pending."""
        if self.batch_wait_timeout_s <= 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_timeout_s
        while self._pending_size() < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _drain(self) -> None:
        while self.pending:
            await self._wait_for_company()
            group = self._take_group()
            if not group:
                continue
            try:
                await self._run_group(group)
            except BaseException as exc:  # cancelled with the loop: nobody may wait forever
                failure = exc if isinstance(exc, Exception) else RuntimeError("the Embedder is shutting down")
                for item in [*group, *self.pending]:
                    if not item.future.done():
                        item.future.set_exception(failure)
                self.pending.clear()
                raise

    async def _run_group(self, group: list[_Pending]) -> None:
        formed = time.perf_counter()
        stacked = np.stack([array for item in group for array in item.arrays])
        started = time.perf_counter()
        try:
            rows, ran_from, ran_to = await asyncio.get_running_loop().run_in_executor(
                self.model_thread, self._timed_forward, stacked
            )
        except Exception as exc:
            for item in group:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        back = time.perf_counter()
        offset = 0
        for item in group:
            if not item.future.done():
                item.future.set_result(rows[offset : offset + len(item.arrays)])
            offset += len(item.arrays)
        # Metrics after the answers, as a callback queued behind the callers' wake-ups: recording
        # (a Ray metric costs ~0.1 ms) never delays a response, least of all a lone one.
        timings = (formed, started, ran_from, ran_to, back)
        asyncio.get_running_loop().call_soon(self._account, group, len(stacked), timings)

    def _account(self, group: list[_Pending], size: int, timings: tuple[float, float, float, float, float]) -> None:
        formed, started, ran_from, ran_to, back = timings
        if self.observe is not None:
            self.observe(size, back - started)
        if self.stages is not None:
            for item in group:
                self.stages.add("queue", formed - item.submitted)
                self.stages.add("stack", started - formed)
                self.stages.add("to model thread", ran_from - started)
                self.stages.add("from model thread", back - ran_to)
            self.stages.add("forward", ran_to - ran_from)

    def _timed_forward(self, stacked: np.ndarray) -> tuple[np.ndarray, float, float]:
        """On the model thread: the rows, and when the pass began and ended there (the hand-offs are the rest)."""
        ran_from = time.perf_counter()
        rows = self.forward(stacked)
        return rows, ran_from, time.perf_counter()
