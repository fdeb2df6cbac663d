"""The version handover of the Ingress (serve_app/versions.py), without Ray or files."""

from __future__ import annotations

import asyncio
import logging

import pytest

from image_search.errors import ArtifactError, StoreUnavailable, Unavailable
from serve_app.versions import ServedVersion, VersionBook, VersionFollower


def book(name: str = "v1") -> VersionBook[str]:
    return VersionBook(current=ServedVersion(name, f"manifest-{name}"))


def test_a_lease_keeps_its_version_across_a_switch() -> None:
    versions = book("v1")
    with versions.lease() as held:
        versions.switch(ServedVersion("v2", "manifest-v2"))
        assert held.name == "v1" and held.manifest == "manifest-v1"
        assert versions.serving() == ["v2", "v1"]
        with versions.lease() as fresh:
            assert fresh.name == "v2"
    assert versions.serving() == ["v2"]
    assert not versions.in_use


def test_a_lease_is_released_when_the_request_fails() -> None:
    versions = book()
    with pytest.raises(RuntimeError), versions.lease():
        raise RuntimeError("search failed")
    assert not versions.in_use


def test_refusal_is_reported_once_and_the_version_is_not_wanted_again() -> None:
    versions = book()
    assert versions.wants("v2")
    assert versions.refuse("v2", "checksum") is True
    assert versions.refuse("v2", "checksum") is False
    assert not versions.wants("v2") and not versions.wants("v1")


class Published:
    """A fake CURRENT pointer and prepare step, counting the prepares."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.broken: dict[str, Exception] = {}
        self.prepared: list[str] = []

    async def read(self) -> str:
        return self.name

    async def prepare(self, name: str) -> ServedVersion[str]:
        self.prepared.append(name)
        if name in self.broken:
            raise self.broken[name]
        return ServedVersion(name, f"manifest-{name}")


def follower(published: Published, versions: VersionBook[str]) -> VersionFollower[str]:
    return VersionFollower(versions, published.read, published.prepare)


def test_follower_switches_only_after_prepare_succeeds() -> None:
    versions, published = book("v1"), Published("v1")
    follow = follower(published, versions)
    assert asyncio.run(follow.poll_once()) == "unchanged"
    assert published.prepared == []
    published.name = "v2"
    assert asyncio.run(follow.poll_once()) == "switched"
    assert versions.current.name == "v2" and published.prepared == ["v2"]


def test_broken_version_is_refused_logged_once_and_old_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    versions, published = book("v1"), Published("v2")
    published.broken["v2"] = ArtifactError("index.faiss checksum does not match")
    follow = follower(published, versions)
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        outcomes = [asyncio.run(follow.poll_once()) for _ in range(3)]
    assert outcomes == ["refused", "unchanged", "unchanged"]
    assert published.prepared == ["v2"]  # not re-checked on every poll
    assert versions.current.name == "v1"
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and "checksum" in refusals[0].getMessage()
    published.name = "v3"  # the next publish is considered on its own merits
    assert asyncio.run(follow.poll_once()) == "switched"
    assert versions.current.name == "v3"


@pytest.mark.parametrize(
    "failure",
    [
        # What ServedIndex.prepare raises when the store fails (tests/test_store_faults.py drives the real path).
        StoreUnavailable("cannot read index version v2 just now: cannot read s3://b/x: SlowDown"),
        # What `downstream` raises while the Searcher replica is being replaced.
        Unavailable("A part of the service is restarting; try again in a moment."),
    ],
    ids=["store unavailable", "searcher restarting"],
)
def test_transient_failure_is_retried_and_logged_once(caplog: pytest.LogCaptureFixture, failure: Exception) -> None:
    versions, published = book("v1"), Published("v2")
    published.broken["v2"] = failure
    follow = follower(published, versions)
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert [asyncio.run(follow.poll_once()) for _ in range(3)] == ["retry"] * 3
    assert published.prepared == ["v2"] * 3
    assert len([r for r in caplog.records if "will retry" in r.getMessage()]) == 1
    del published.broken["v2"]
    assert asyncio.run(follow.poll_once()) == "switched"


def test_unreadable_pointer_is_transient_not_a_refusal() -> None:
    versions = book("v1")

    async def read() -> str:
        raise ArtifactError("CURRENT holds an invalid version name")

    async def prepare(name: str) -> ServedVersion[str]:
        raise AssertionError("nothing to prepare")

    assert asyncio.run(VersionFollower(versions, read, prepare).poll_once()) == "retry"
    assert not versions.refused
