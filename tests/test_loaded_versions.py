"""The versions one Searcher holds (serve_app/loaded_versions.py), with a fake loader."""

from __future__ import annotations

import asyncio
import threading

import pytest

from image_search.errors import ArtifactError
from serve_app.loaded_versions import LoadedVersions, Preloader, in_thread


def test_loads_on_demand_and_drops_the_least_recently_used() -> None:
    loads: list[str] = []

    def load(name: str) -> str:
        loads.append(name)
        return f"index-{name}"

    async def scenario() -> LoadedVersions[str]:
        held = LoadedVersions(2, in_thread(load))
        assert await held.get("v1") == "index-v1"
        assert await held.get("v2") == "index-v2"
        await held.get("v1")  # v1 used last: v2 is now the oldest
        assert await held.get("v3") == "index-v3"
        return held

    held = asyncio.run(scenario())
    assert held.names() == ["v1", "v3"]
    assert loads == ["v1", "v2", "v3"]


def test_concurrent_requests_for_a_missing_version_load_it_once() -> None:
    gate = threading.Event()
    loads: list[str] = []

    def load(name: str) -> str:
        loads.append(name)
        assert gate.wait(10)
        return f"index-{name}"

    async def scenario() -> list[str]:
        held = LoadedVersions(3, in_thread(load))
        waiting = [asyncio.create_task(held.get("v2")) for _ in range(8)]
        while not loads:  # the first request's load is running in its thread
            await asyncio.sleep(0.001)
        gate.set()
        return await asyncio.gather(*waiting)

    assert asyncio.run(scenario()) == ["index-v2"] * 8
    assert loads == ["v2"]


def test_a_failed_load_fails_its_waiters_and_is_tried_again_later() -> None:
    attempts: list[str] = []

    def load(name: str) -> str:
        attempts.append(name)
        if len(attempts) == 1:
            raise OSError("not there yet")
        return f"index-{name}"

    async def scenario() -> str:
        held = LoadedVersions(2, in_thread(load))
        with pytest.raises(OSError):
            await held.get("v1")
        assert held.names() == []
        return await held.get("v1")

    assert asyncio.run(scenario()) == "index-v1"
    assert attempts == ["v1", "v1"]


class GatedLoader:
    """A loader that blocks (in its thread) until the test opens the gate; counts its loads."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.loads: list[str] = []

    def __call__(self, name: str) -> str:
        self.loads.append(name)
        self.started.set()
        assert self.gate.wait(10)
        return f"index-{name}"

    async def until_started(self) -> None:
        for _ in range(10_000):  # bounded: 10 s at most
            if self.started.is_set():
                return
            await asyncio.sleep(0.001)
        raise AssertionError("the load never started")


def test_cancelling_the_caller_that_started_a_load_leaves_the_load_running() -> None:
    loader = GatedLoader()

    async def scenario() -> tuple[str, str]:
        held = LoadedVersions(3, in_thread(loader))
        first = asyncio.create_task(held.get("v2"))
        await loader.until_started()
        second = asyncio.create_task(held.get("v2"))  # joins the running load
        first.cancel()  # the client that asked first went away
        with pytest.raises(asyncio.CancelledError):
            await first
        loader.gate.set()
        later = await held.get("v2")  # may find the load running or done: either way its result
        return await second, later

    assert asyncio.run(scenario()) == ("index-v2", "index-v2")
    assert loader.loads == ["v2"]  # one load, not restarted by the cancellation


def test_the_preloader_survives_the_cancellation_of_the_search_that_started_the_load() -> None:
    loader = GatedLoader()
    pointer = Pointer("v2")

    async def scenario() -> tuple[str | None, list[str]]:
        held = LoadedVersions(3, in_thread(loader))
        preloader = Preloader(held, pointer.read)
        search = asyncio.create_task(held.get("v2"))
        await loader.until_started()
        preloading = asyncio.create_task(preloader.preload_once())  # waits on the search's load
        await asyncio.sleep(0)  # let it join the load before the search goes away
        search.cancel()
        with pytest.raises(asyncio.CancelledError):
            await search
        loader.gate.set()
        return await preloading, held.names()

    assert asyncio.run(scenario()) == ("v2", ["v2"])
    assert loader.loads == ["v2"]


class Pointer:
    def __init__(self, name: str) -> None:
        self.name = name

    async def read(self) -> str:
        return self.name


def test_preloader_loads_each_new_published_version_once() -> None:
    loads: list[str] = []

    def load(name: str) -> str:
        loads.append(name)
        if name == "broken":
            raise ArtifactError("index.faiss: its checksum does not match")
        return f"index-{name}"

    pointer = Pointer("v1")

    async def scenario() -> list[str | None]:
        preloader = Preloader(LoadedVersions(3, in_thread(load)), pointer.read)
        outcomes = [await preloader.preload_once(), await preloader.preload_once()]
        pointer.name = "broken"
        outcomes += [await preloader.preload_once(), await preloader.preload_once()]
        pointer.name = "v2"
        outcomes.append(await preloader.preload_once())
        return outcomes

    assert asyncio.run(scenario()) == ["v1", None, None, None, "v2"]
    assert loads == ["v1", "broken", "v2"]  # the broken one is not hashed again on every poll
