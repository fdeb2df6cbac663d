"""The Ingress's decode bound without Ray: at most max_concurrent_decodes decodes at once, whatever the requests."""

from __future__ import annotations

import asyncio
import threading

from serve_app.deployments.ingress import Ingress
from serve_app.multipart import Upload

BOUND_S = 30.0


def test_no_more_than_the_named_number_of_decodes_run_at_once() -> None:
    ingress = Ingress.func_or_class.__new__(Ingress.func_or_class)
    running, most = 0, 0
    lock = threading.Lock()
    gate = threading.Event()
    two_running = threading.Event()

    def prepare(upload: Upload) -> str:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            if running == 2:
                two_running.set()
        gate.wait(BOUND_S)  # held until the test has seen whether a third one starts
        with lock:
            running -= 1
        return upload.filename

    ingress._prepare = prepare  # type: ignore[method-assign]

    async def scenario() -> list[str]:
        ingress.decode_slots = asyncio.Semaphore(2)
        tasks = [asyncio.ensure_future(ingress._prepare_in_slot(Upload(f"{i}.jpg", "image/jpeg"))) for i in range(6)]
        assert await asyncio.to_thread(two_running.wait, BOUND_S)
        await asyncio.sleep(0)  # let any third decode that could start, start
        with lock:
            assert running == 2
        gate.set()
        return list(await asyncio.wait_for(asyncio.gather(*tasks), BOUND_S))

    assert asyncio.run(scenario()) == [f"{i}.jpg" for i in range(6)]
    assert most == 2
