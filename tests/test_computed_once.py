"""ComputedOnce: callers asking for one key at once share one run; failures are retried; a caller
that gives up does not cancel the others' run; only the last `entries` keys are kept."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.computed_once import ComputedOnce


def test_callers_asking_at_once_share_one_run() -> None:
    async def scenario() -> None:
        once: ComputedOnce[str, int] = ComputedOnce(entries=2)
        gate = asyncio.Event()
        started = asyncio.Event()
        runs = 0

        async def compute() -> int:
            nonlocal runs
            runs += 1
            started.set()
            await gate.wait()
            return 42

        callers = [asyncio.ensure_future(once.get("v1", compute))]
        await started.wait()  # the first run is in flight: the others ask while it runs
        callers += [asyncio.ensure_future(once.get("v1", compute)) for _ in range(4)]
        gate.set()
        assert await asyncio.gather(*callers) == [42] * 5
        assert runs == 1
        assert await once.get("v1", compute) == 42
        assert runs == 1

    asyncio.run(scenario())


def test_a_failed_run_is_forgotten_and_the_next_caller_runs_again() -> None:
    async def scenario() -> None:
        once: ComputedOnce[str, int] = ComputedOnce(entries=2)
        attempts = 0

        async def flaky() -> int:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                raise OSError("store unavailable")
            return 7

        with pytest.raises(OSError):
            await once.get("v1", flaky)
        assert "v1" not in once
        assert await once.get("v1", flaky) == 7
        assert attempts == 2

    asyncio.run(scenario())


def test_a_caller_that_gives_up_does_not_cancel_the_run_others_await() -> None:
    async def scenario() -> None:
        once: ComputedOnce[str, int] = ComputedOnce(entries=2)
        gate = asyncio.Event()
        started = asyncio.Event()

        async def compute() -> int:
            started.set()
            await gate.wait()
            return 3

        quitter = asyncio.ensure_future(once.get("v1", compute))
        stayer = asyncio.ensure_future(once.get("v1", compute))
        await started.wait()
        quitter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await quitter
        gate.set()
        assert await stayer == 3
        assert "v1" in once

    asyncio.run(scenario())


def test_only_the_last_entries_keys_are_kept() -> None:
    async def scenario() -> None:
        once: ComputedOnce[str, str] = ComputedOnce(entries=2)
        for key in ("a", "b", "c"):

            async def compute(key: str = key) -> str:
                return key.upper()

            assert await once.get(key, compute) == key.upper()
        assert "a" not in once
        assert "b" in once and "c" in once

    asyncio.run(scenario())


def test_keeping_no_entries_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ComputedOnce(entries=0)
