"""The Ingress's side of the published index: which version it serves, following CURRENT, the images.

It starts on CURRENT (falling back to the newest older version that passes its checks, so a
replaced Ingress replica comes back even when the latest publish is broken; a store it cannot
read just now is retried instead, see serve_app/store_faults.py), and, every
`reload_interval_s`, hands over to a newly published version once that version fits the model and a
Searcher has it loaded and verified (serve_app/versions.py has the protocol). Requests lease a
version for their whole life: the Searcher is asked for that version, and that version's records
(`VersionRecords`, built per segment, serve_app/version_records.py) turn the ids into images.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from image_search.artifact import list_versions, version_manifest
from image_search.compatibility import check_compatible
from image_search.errors import ArtifactError, StoreUnavailable
from image_search.segments import POINTER, SegmentInfo, read_pointer, read_segment_records, read_version
from image_search.segments import Version as SegmentedVersion
from image_search.storage import Store, open_store
from serve_app.segmented_versions import SegmentedVersions
from serve_app.store_faults import io_failures_are_transient
from serve_app.version_records import SegmentRecords, VersionRecords, assemble_records
from serve_app.versions import ServedVersion, VersionBook, VersionFollower

logger = logging.getLogger("ray.serve")

Version = ServedVersion[VersionRecords]
# Versions whose record lookups the Ingress keeps for reuse (their segments are shared): the one it
# serves, the one before it (requests still finishing on it), and one more publish.
HELD_VERSIONS = 3
PrepareCall = Callable[[str], Awaitable[int]]
T = TypeVar("T")


@dataclass(frozen=True)
class StartRetry:
    """How long a starting Ingress keeps trying a version whose files it cannot read (or whose
    Searcher is not up): `attempts` tries, waiting `first_delay_s`, doubling up to `max_delay_s`
    (the defaults wait about 40 s in all, then the replica fails and Serve starts it again)."""

    attempts: int = 8
    first_delay_s: float = 0.5
    max_delay_s: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.first_delay_s < 0 or self.max_delay_s < self.first_delay_s:
            raise ValueError("StartRetry needs attempts >= 1 and 0 <= first_delay_s <= max_delay_s")

    def delays(self) -> Iterator[float]:
        """The waits between attempts: attempts - 1 of them."""
        delay = self.first_delay_s
        for _ in range(self.attempts - 1):
            yield delay
            delay = min(delay * 2, self.max_delay_s)


class ServedIndex:
    def __init__(
        self,
        store: Store,
        model_identity: dict[str, Any],
        prepare_searcher: PrepareCall,
        images_location: str | None,
        start_retry: StartRetry = StartRetry(),
        held_versions: int = HELD_VERSIONS,
    ) -> None:
        self.store = store
        self.start_retry = start_retry
        self.identity = model_identity  # the Embedder's identity(): model, embedding_dim, fingerprint, preprocessing
        self.prepare_searcher = prepare_searcher
        self.images_location = images_location
        self.image_stores: dict[str, Store] = {}
        self.records: SegmentedVersions[SegmentRecords, VersionRecords] = SegmentedVersions(
            held_versions,
            functools.partial(read_version, store),
            self._load_segment_records,
            assemble_records,
            check=self._check_fits_model,
        )
        self.book: VersionBook[VersionRecords] | None = None
        self.follower: VersionFollower[VersionRecords] | None = None
        self.task: asyncio.Task[None] | None = None
        self.catching_up: dict[str, asyncio.Future[Version]] = {}

    # --- versions -------------------------------------------------------------------------------

    async def prepare(self, name: str) -> Version:
        """Read `name`'s version file, check it fits the model, build its record lookup (only for
        segments not held yet, off the event loop), then have a Searcher load and verify it.

        ArtifactError: the version itself is unusable (refused). StoreUnavailable: its files could
        not be read just now (retried; the Searcher reports its own read failures the same way).
        """
        with io_failures_are_transient(f"index version {name} at {self.store.uri}"):
            records = await self.records.get(name)
        count = await self.prepare_searcher(name)
        if count != records.count:
            raise ArtifactError(f"version {name}: the Searcher holds {count} live vectors, its version {records.count}")
        return ServedVersion(name, records)

    def _check_fits_model(self, version: SegmentedVersion) -> None:
        check_compatible(
            version_manifest(version, ()),
            model_name=self.identity["model"],
            embedding_dim=self.identity["embedding_dim"],
            fingerprint=self.identity["fingerprint"],
            preprocessing=self.identity["preprocessing"],
        )

    def _load_segment_records(self, info: SegmentInfo) -> SegmentRecords:
        return SegmentRecords.of(info, read_segment_records(self.store, info))

    async def start(self) -> Version:
        """The first version: CURRENT, or the newest older one that passes if CURRENT is refused.

        Only a refusal (ArtifactError) moves on to an older version. Anything else (the store
        unreadable for a moment, a Searcher not up yet) is retried on the same version, a bounded
        number of times, and then fails the start with the last reason: falling back on it would
        make this replica serve an older version than the others.
        """
        current = await self._retried("read CURRENT", lambda: asyncio.to_thread(read_pointer, self.store))
        if current is None:
            raise ArtifactError(
                f"no published index at {self.store.uri} (no {POINTER}); "
                "build one with `python -m index_builder --images SRC --out DST`"
            )
        published = await self._retried("list versions", lambda: asyncio.to_thread(list_versions, self.store))
        older = [info.name for info in reversed(published) if info.name != current]  # newest first
        refused: dict[str, str] = {}
        for name in [current, *older]:
            try:
                version = await self._retried(f"load index version {name}", functools.partial(self.prepare, name))
            except ArtifactError as exc:
                logger.error("index version %s refused: %s", name, exc)
                refused[name] = str(exc)
                continue
            self.book = VersionBook(current=version, refused=refused)
            logger.info("Ingress serves index version %s (%d images)", name, version.manifest.count)
            return version
        raise ArtifactError(f"no published index version at {self.store.uri} passes its checks: {refused}")

    async def _retried(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()`, tried again after transient failures (see `start`); ArtifactError passes at once."""
        delays = self.start_retry.delays()
        while True:
            try:
                return await attempt()
            except ArtifactError:
                raise
            except Exception as exc:
                reason = str(exc) if isinstance(exc, StoreUnavailable) else f"{type(exc).__name__}: {exc}"
                reason = reason.splitlines()[0][:1000]
                delay = next(delays, None)
                if delay is None:
                    raise StoreUnavailable(
                        f"gave up trying to {what} after {self.start_retry.attempts} attempts: {reason}; "
                        f"check that {self.store.uri} is reachable (and the Searchers are running)"
                    ) from exc
                logger.warning("could not %s (retrying in %.2g s): %s", what, delay, reason)
                await asyncio.sleep(delay)  # a back-off between attempts, not a synchronisation

    def follow(self, interval_s: float) -> None:
        """Poll CURRENT every `interval_s` on this event loop (always on: see AppArgs.reload_interval_s)."""
        if interval_s <= 0:
            raise ValueError("reload_interval_s must be above 0: the served version must follow CURRENT")
        book = self._book()

        async def read() -> str:
            name = await asyncio.to_thread(read_pointer, self.store)
            if name is None:
                raise ArtifactError(f"{self.store.uri}/{POINTER} is gone")  # transient for the follower
            return name

        self.follower = VersionFollower(book, read, self.prepare)
        self.task = asyncio.get_running_loop().create_task(self.follower.run(interval_s))

    def following_works(self) -> bool:
        """False when the follow loop ended or never started: the health check then fails."""
        return self.task is not None and not self.task.done()

    def _book(self) -> VersionBook[VersionRecords]:
        if self.book is None:
            raise RuntimeError("ServedIndex.start() has not run")
        return self.book

    async def serve_at_least(self, name: str) -> None:
        """Serve `name` (or a newer version) before returning: read-your-writes for the Ingress that took a write.

        Version names sort by creation time. Requests waiting for the same version share one prepare.
        """
        book = self._book()
        if book.current.name >= name:
            return
        task = self.catching_up.get(name)
        if task is None:
            task = self.catching_up[name] = asyncio.ensure_future(self.prepare(name))
            task.add_done_callback(lambda _: self.catching_up.pop(name, None))
        version = await asyncio.shield(task)
        if book.current.name < name:
            previous = book.switch(version)
            logger.info("index version %s now serves after a write (was %s)", name, previous)

    @contextlib.contextmanager
    def lease(self) -> Iterator[Version]:
        with self._book().lease() as version:
            yield version

    @property
    def current(self) -> Version:
        return self._book().current

    def describe(self) -> dict[str, Any]:
        """What serves, for /info and /healthz (version names only: no server paths)."""
        book = self._book()
        return {
            "index_version": book.current.name,
            "index_size": book.current.manifest.count,
            "serving_versions": book.serving(),
            "refused_versions": sorted(book.refused),
        }

    # --- images ---------------------------------------------------------------------------------

    def images(self, version: Version) -> Store:
        """Where `version`'s image keys resolve: the `images` setting, else the collection's build-time root."""
        location = self.images_location or version.manifest.source
        store = self.image_stores.get(location)
        if store is None:
            store = self.image_stores[location] = open_store(location)
        return store
