"""The Ingress's side of the published index: which version it serves, following CURRENT, the images.

It starts on CURRENT (falling back to the newest older version that passes its checks, so a
replaced Ingress replica comes back even when the latest publish is broken), and, every
`reload_interval_s`, hands over to a newly published version once that version's manifest fits the
model and a Searcher has it loaded and verified (serve_app/versions.py has the protocol). Requests
lease a version for their whole life: the Searcher is asked for that version, and that version's
manifest turns the ids into records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from image_search.artifact import list_versions, load_manifest, read_current, version_folder
from image_search.compatibility import check_compatible
from image_search.errors import ArtifactError
from image_search.manifest import Manifest
from image_search.storage import Store, open_store
from serve_app.versions import ServedVersion, VersionBook, VersionFollower

logger = logging.getLogger("ray.serve")

Version = ServedVersion[Manifest]
PrepareCall = Callable[[str], Awaitable[int]]


class ServedIndex:
    def __init__(
        self,
        store: Store,
        model_identity: dict[str, Any],
        prepare_searcher: PrepareCall,
        images_location: str | None,
    ) -> None:
        self.store = store
        self.identity = model_identity  # the Embedder's identity(): model, embedding_dim, fingerprint, preprocessing
        self.prepare_searcher = prepare_searcher
        self.images_location = images_location
        self.image_stores: dict[str, Store] = {}
        self.book: VersionBook[Manifest] | None = None
        self.follower: VersionFollower[Manifest] | None = None
        self.task: asyncio.Task[None] | None = None
        self.catching_up: dict[str, asyncio.Future[Version]] = {}

    # --- versions -------------------------------------------------------------------------------

    async def prepare(self, name: str) -> Version:
        """Load and check `name`'s manifest, then have a Searcher load and verify its index."""
        manifest = await asyncio.to_thread(load_manifest, self.store, version_folder(name))
        check_compatible(
            manifest,
            model_name=self.identity["model"],
            embedding_dim=self.identity["embedding_dim"],
            fingerprint=self.identity["fingerprint"],
            preprocessing=self.identity["preprocessing"],
        )
        count = await self.prepare_searcher(name)
        if count != manifest.count:
            raise ArtifactError(f"version {name}: the index holds {count} vectors, its manifest {manifest.count}")
        return ServedVersion(name, manifest)

    async def start(self) -> Version:
        """The first version: CURRENT, or the newest older one that passes if CURRENT does not."""
        current = await asyncio.to_thread(read_current, self.store)
        published = await asyncio.to_thread(list_versions, self.store)  # oldest first
        older = [info.name for info in reversed(published) if info.name != current]
        refused: dict[str, str] = {}
        for name in [current, *older]:
            try:
                version = await self.prepare(name)
            except ArtifactError as exc:
                logger.error("index version %s refused: %s", name, exc)
                refused[name] = str(exc)
                continue
            self.book = VersionBook(current=version, refused=refused)
            logger.info("Ingress serves index version %s (%d images)", name, version.manifest.count)
            return version
        raise ArtifactError(f"no published index version at {self.store.uri} passes its checks: {refused}")

    def follow(self, interval_s: float) -> None:
        """Poll CURRENT every `interval_s` on this event loop (0: do not follow)."""
        if interval_s <= 0:
            return
        book = self._book()

        async def read() -> str:
            return await asyncio.to_thread(read_current, self.store)

        self.follower = VersionFollower(book, read, self.prepare)
        self.task = asyncio.get_running_loop().create_task(self.follower.run(interval_s))

    def following_works(self) -> bool:
        """False when the follow loop ended (it never should): the health check then fails."""
        return self.task is None or not self.task.done()

    def _book(self) -> VersionBook[Manifest]:
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
