"""Calls from the Ingress into the other deployments, with Serve's failures turned into our 503s."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from image_search.errors import Overloaded, Unavailable

logger = logging.getLogger("ray.serve")

T = TypeVar("T")


async def downstream(call: Awaitable[T]) -> T:
    """Await a call into another deployment, turning Serve's failures into our 503 errors.

    (Serve installs its own plain-text handlers for these on the ASGI app, so they are mapped
    here, where they are found; serve_app.http_errors renders them.)
    """
    try:
        return await call
    except BackPressureError:
        raise Overloaded("The service is busy; try again in a moment.") from None
    except (DeploymentUnavailableError, RayActorError):
        raise Unavailable("A part of the service is restarting; try again in a moment.") from None


async def retried(make_call: Callable[[], Awaitable[T]], attempts: int, what: str) -> T:
    """`downstream(make_call())`, sent again when a replica died under it (for idempotent reads only)."""
    for attempt in range(1, attempts + 1):
        try:
            return await downstream(make_call())
        except Unavailable:
            if attempt == attempts:
                raise
            logger.warning("a %s replica died during a call; retrying on another (%d/%d)", what, attempt, attempts)
    raise ValueError("attempts must be >= 1")


async def await_with_progress(call: Awaitable[T], timeout_s: float, what: str, log_every_s: float = 10.0) -> T:
    """Await `call` for at most `timeout_s`, logging every `log_every_s` what is still awaited.

    Start-up waits on other deployments this way, so a collaborator that never becomes healthy
    leaves a line in the log and a failed replica (TimeoutError) instead of a silent hang.
    """
    task = asyncio.ensure_future(call)
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        remaining = timeout_s - (loop.time() - started)
        if remaining <= 0:
            task.cancel()
            raise TimeoutError(f"gave up after {timeout_s:g} s waiting for {what}")
        done, _ = await asyncio.wait({task}, timeout=min(log_every_s, remaining))
        if done:
            return task.result()
        logger.warning("still waiting for %s (%.0f s of %g s)", what, loop.time() - started, timeout_s)
