"""Following the published index version: which one the Ingress serves, and the handover to a new one.

The Ingress owns a `VersionBook`: the version new requests use, and how many requests still hold
each older one. A request takes a lease for its whole life, so the manifest that turns its Searcher
ids into records is always the manifest of the version the Searcher searched (the search call names
the version). A `VersionFollower` polls the published pointer (CURRENT) and hands over only after
the new version was loaded, checked against the model, and prepared by a Searcher; a version that
fails is refused once, with its reason logged once, and the old one keeps serving.

No Ray and no storage here: the I/O arrives as callables, so all of it is unit-tested directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from image_search.errors import ArtifactError, StoreUnavailable

logger = logging.getLogger("ray.serve")

M = TypeVar("M")  # what a version carries for the Ingress (its Manifest); generic so tests need no files

PollOutcome = Literal["unchanged", "switched", "refused", "retry"]


@dataclass(frozen=True)
class ServedVersion(Generic[M]):
    name: str
    manifest: M


@dataclass
class VersionBook(Generic[M]):
    """The version new requests get, the ones old requests still hold, and the versions refused."""

    current: ServedVersion[M]
    in_use: Counter[str] = field(default_factory=Counter)
    refused: dict[str, str] = field(default_factory=dict)

    @contextlib.contextmanager
    def lease(self) -> Iterator[ServedVersion[M]]:
        """The current version, held for one request: a switch meanwhile does not change what it sees."""
        version = self.current
        self.in_use[version.name] += 1
        try:
            yield version
        finally:
            self.in_use[version.name] -= 1
            if self.in_use[version.name] <= 0:
                del self.in_use[version.name]

    def wants(self, name: str) -> bool:
        return name != self.current.name and name not in self.refused

    def refuse(self, name: str, reason: str) -> bool:
        """Remember a refused version; True the first time (so the reason is logged once, not every poll)."""
        first = name not in self.refused
        self.refused[name] = reason
        return first

    def switch(self, version: ServedVersion[M]) -> str:
        """Make `version` the one new requests get; returns the name it replaced."""
        previous = self.current.name
        self.current = version
        return previous

    def serving(self) -> list[str]:
        """Every version an answer may come from right now: the current one first, then older ones still held."""
        return [self.current.name, *sorted(name for name in self.in_use if name != self.current.name)]


class VersionFollower(Generic[M]):
    """Polls the published pointer and hands the book over to a new version once it is ready.

    `read_current` returns the published version's name; `prepare` loads and checks it (manifest,
    compatibility with the model, a Searcher that has it loaded) and raises ArtifactError when the
    version itself is unusable (checksum, format, model). StoreUnavailable (its files could not be
    read just now) and any other exception (a Searcher restarting) are transient: logged once per
    distinct reason and tried again at the next poll, never a refusal.
    """

    def __init__(
        self,
        book: VersionBook[M],
        read_current: Callable[[], Awaitable[str]],
        prepare: Callable[[str], Awaitable[ServedVersion[M]]],
    ) -> None:
        self.book = book
        self.read_current = read_current
        self.prepare = prepare
        self.last_transient: str | None = None

    async def poll_once(self) -> PollOutcome:
        try:
            name = await self.read_current()
        except Exception as exc:  # an unreadable pointer is not a version to refuse: try again next time
            return self._transient(exc)
        if not self.book.wants(name):
            self._clear_transient()
            return "unchanged"
        serving = self.book.current.name
        try:
            version = await self.prepare(name)
        except StoreUnavailable as exc:  # says nothing about the version: never refuse it for this
            return self._transient(exc)
        except ArtifactError as exc:
            if self.book.refuse(name, str(exc)):
                logger.error("index version %s refused; still serving %s: %s", name, self.book.current.name, exc)
            return "refused"
        except Exception as exc:
            return self._transient(exc)
        self._clear_transient()
        if self.book.current.name != serving:
            # Switched meanwhile by someone who knew of a later publish (a write that waits to be served,
            # serve_app/served_index.py): what was read is stale, so it must not undo that switch.
            return "unchanged"
        previous = self.book.switch(version)
        logger.info("index version %s now serves (was %s)", version.name, previous)
        return "switched"

    def _transient(self, exc: Exception) -> PollOutcome:
        # Ray's wrapped errors carry the remote traceback after the first line: keep the first only.
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        if reason != self.last_transient:
            logger.warning("cannot check for a new index version (will retry): %s", reason)
            self.last_transient = reason
        return "retry"

    def _clear_transient(self) -> None:
        if self.last_transient is not None:
            logger.info("checking for new index versions works again")
            self.last_transient = None

    async def run(self, interval_s: float) -> None:
        """Poll forever, every `interval_s` (a polling period, not a synchronisation)."""
        while True:
            await asyncio.sleep(interval_s)
            await self.poll_once()
