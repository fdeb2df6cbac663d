"""ForwardCoalescer without Ray: merging behind a busy model, limits, order and failures."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from serve_app.coalescing import ForwardCoalescer
from serve_app.stage_times import StageTimes


class GatedForward:
    """A forward pass that returns each row's first value and blocks until the test opens the gate."""

    def __init__(self, fail_on_size: int | None = None) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.sizes: list[int] = []
        self.fail_on_size = fail_on_size

    def __call__(self, stacked: np.ndarray) -> np.ndarray:
        self.sizes.append(len(stacked))
        self.started.set()
        self.gate.wait(timeout=30)
        if len(stacked) == self.fail_on_size:
            raise RuntimeError("forward failed")
        return stacked.reshape(len(stacked), -1)[:, :1].astype(np.float32)


def crops(*values: int) -> list[np.ndarray]:
    return [np.full((2, 2, 3), value, dtype=np.uint8) for value in values]


async def wait_started(forward: GatedForward) -> None:
    await asyncio.to_thread(forward.started.wait, 30)
    forward.started.clear()


async def let_tasks_enqueue(coalescer: ForwardCoalescer, expected: int) -> None:
    """One pass of the event loop runs every new task up to its first await: its submission."""
    await asyncio.sleep(0)
    assert len(coalescer.pending) == expected


def test_submissions_queued_behind_a_busy_model_run_as_one_batch() -> None:
    async def scenario() -> tuple[list[int], list[np.ndarray]]:
        forward = GatedForward()
        observed: list[int] = []
        coalescer = ForwardCoalescer(forward, max_batch_size=16, observe=lambda size, seconds: observed.append(size))
        first = asyncio.create_task(coalescer.run(crops(1)))
        await wait_started(forward)  # the model is busy with [1]
        queued = [asyncio.create_task(coalescer.run(crops(value, value + 1))) for value in (10, 20, 30)]
        await let_tasks_enqueue(coalescer, 3)
        forward.gate.set()
        results = await asyncio.gather(first, *queued)
        assert observed == forward.sizes
        return forward.sizes, results

    sizes, results = asyncio.run(scenario())
    assert sizes == [1, 6]
    assert [row.ravel().tolist() for row in results] == [[1], [10, 11], [20, 21], [30, 31]]


def test_a_merged_batch_never_exceeds_max_batch_size_and_submissions_are_not_split() -> None:
    async def scenario() -> list[int]:
        forward = GatedForward()
        coalescer = ForwardCoalescer(forward, max_batch_size=4)
        first = asyncio.create_task(coalescer.run(crops(0)))
        await wait_started(forward)
        sizes = (3, 1, 2, 5, 1)  # 5 > max_batch_size still runs, alone
        queued = [asyncio.create_task(coalescer.run(crops(*range(size)))) for size in sizes]
        await let_tasks_enqueue(coalescer, 5)
        forward.gate.set()
        await asyncio.gather(first, *queued)
        return forward.sizes

    assert asyncio.run(scenario()) == [1, 4, 2, 5, 1]


def test_an_idle_model_starts_at_once() -> None:
    async def scenario() -> list[int]:
        forward = GatedForward()
        forward.gate.set()
        coalescer = ForwardCoalescer(forward, max_batch_size=16)
        for value in range(3):
            assert (await coalescer.run(crops(value))).ravel().tolist() == [value]
        return forward.sizes

    assert asyncio.run(scenario()) == [1, 1, 1]


def test_a_failed_forward_fails_its_group_only() -> None:
    async def scenario() -> tuple[list[BaseException | np.ndarray], np.ndarray]:
        forward = GatedForward(fail_on_size=3)
        coalescer = ForwardCoalescer(forward, max_batch_size=3)
        first = asyncio.create_task(coalescer.run(crops(0)))
        await wait_started(forward)
        doomed = [asyncio.create_task(coalescer.run(crops(value))) for value in (1, 2, 3)]
        await let_tasks_enqueue(coalescer, 3)
        forward.gate.set()
        outcomes = await asyncio.gather(first, *doomed, return_exceptions=True)
        return outcomes, await coalescer.run(crops(7))

    outcomes, after = asyncio.run(scenario())
    assert outcomes[0].ravel().tolist() == [0]  # type: ignore[union-attr]
    assert all(isinstance(outcome, RuntimeError) for outcome in outcomes[1:])
    assert after.ravel().tolist() == [7]


def test_a_caller_that_gave_up_is_left_out_of_the_next_batch() -> None:
    async def scenario() -> list[int]:
        forward = GatedForward()
        coalescer = ForwardCoalescer(forward, max_batch_size=16)
        first = asyncio.create_task(coalescer.run(crops(0)))
        await wait_started(forward)
        abandoned = asyncio.create_task(coalescer.run(crops(1, 2)))
        kept = asyncio.create_task(coalescer.run(crops(3)))
        await let_tasks_enqueue(coalescer, 2)
        abandoned.cancel()
        forward.gate.set()
        await asyncio.gather(first, kept)
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        return forward.sizes

    assert asyncio.run(scenario()) == [1, 1]


def test_running_nothing_is_refused() -> None:
    with pytest.raises(ValueError):
        asyncio.run(ForwardCoalescer(GatedForward(), max_batch_size=4).run([]))


def test_an_idle_model_waiting_for_company_starts_as_soon_as_a_batch_is_full() -> None:
    async def scenario() -> list[int]:
        forward = GatedForward()
        forward.gate.set()
        # A wait far longer than the test may take: only a full batch can start the forward pass.
        coalescer = ForwardCoalescer(forward, max_batch_size=3, batch_wait_timeout_s=3600)
        first = asyncio.create_task(coalescer.run(crops(1)))
        await let_tasks_enqueue(coalescer, 1)
        rest = [asyncio.create_task(coalescer.run(crops(value))) for value in (2, 3)]
        await asyncio.wait_for(asyncio.gather(first, *rest), timeout=30)
        return forward.sizes

    assert asyncio.run(scenario()) == [3]


def test_a_lone_request_runs_alone_once_the_wait_for_company_is_over() -> None:
    async def scenario() -> list[int]:
        forward = GatedForward()
        forward.gate.set()
        coalescer = ForwardCoalescer(forward, max_batch_size=8, batch_wait_timeout_s=0.01)
        await asyncio.wait_for(coalescer.run(crops(1)), timeout=30)
        return forward.sizes

    assert asyncio.run(scenario()) == [1]


def test_stage_times_count_each_submission_and_each_forward_pass_once() -> None:
    async def scenario() -> dict[str, tuple[float, int]]:
        forward = GatedForward()
        stages = StageTimes()
        coalescer = ForwardCoalescer(forward, max_batch_size=16, stages=stages)
        first = asyncio.create_task(coalescer.run(crops(1)))
        await wait_started(forward)  # the model is busy with [1]: the next two queue behind it
        queued = [asyncio.create_task(coalescer.run(crops(value))) for value in (2, 3)]
        await let_tasks_enqueue(coalescer, 2)
        forward.gate.set()
        await asyncio.gather(first, *queued)
        return stages.snapshot()

    snapshot = asyncio.run(scenario())
    for stage in ("queue", "stack", "to model thread", "from model thread"):
        assert snapshot[stage][1] == 3, stage  # one per submission
    assert snapshot["forward"][1] == 2  # [1], then [2, 3] together
    assert all(seconds >= 0 for seconds, _ in snapshot.values())
