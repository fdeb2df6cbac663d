"""A storage error while loading a version is retried, never taken for a broken version (issue 21 item 6).

The faults are the ones production meets: an S3 `503 SlowDown` answered to the real S3 path
(boto3 against the moto server on 127.0.0.1, the answer injected into botocore's send step so the
real parser raises the real `ClientError`, which S3Store turns into StoreError), for the manifest
the Ingress reads and for the segment file a Searcher downloads. No Ray: the Ingress's ServedIndex
runs here with a Searcher's real holdings (`SegmentHoldings`) behind its prepare call.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from image_search.errors import ArtifactError, StoreUnavailable
from image_search.segments import read_version, version_file
from image_search.storage import S3Store, StoreError
from serve_app.config import SearcherOptions
from serve_app.deployments.searcher import SegmentHoldings
from serve_app.loaded_versions import Preloader
from serve_app.served_index import ServedIndex, StartRetry
from serve_app.store_faults import io_failures_are_transient
from serve_app.versions import VersionBook, VersionFollower
from tests.living import build, current_version
from tests.s3_server import S3Server, moto_s3, upload_folder
from tests.support import synthetic_image

BUCKET = "faults"
NO_WAIT = StartRetry(attempts=4, first_delay_s=0.0, max_delay_s=0.0)

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>test</RequestId></Error>"
)


class RawBody:
    """What botocore reads an HTTP answer's body from (urllib3's `stream()`)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, *_args: Any, **_kwargs: Any) -> Iterator[bytes]:
        yield self.data


class SlowDown:
    """Answers `503 SlowDown` to the next `times` S3 requests whose URL contains `fragment`."""

    def __init__(self) -> None:
        self.fragment = ""
        self.times = 0
        self.answered = 0

    def fail(self, fragment: str, times: int) -> None:
        self.fragment, self.times = fragment, times

    def __call__(self, request: Any, **_kwargs: Any) -> Any:
        from botocore.awsrequest import AWSResponse

        if self.times > 0 and self.fragment and self.fragment in request.url:
            self.times -= 1
            self.answered += 1
            return AWSResponse(request.url, 503, {"Content-Type": "application/xml"}, RawBody(SLOW_DOWN))
        return None  # send it for real


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with moto_s3() as server:
        server.client().create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory, image_folder: Path, tiny_model_dir: Path) -> Path:
    """An index folder with two published versions (the second adds one image); CURRENT names the second."""
    images = tmp_path_factory.mktemp("faults-images")
    shutil.copytree(image_folder, images, dirs_exist_ok=True)
    out = tmp_path_factory.mktemp("faults-index")
    build(images, out, tiny_model_dir)
    synthetic_image(9_001).save(images / "added.png")
    build(images, out, tiny_model_dir)
    return out


def s3_store(server: S3Server, prefix: str, slow_down: SlowDown) -> S3Store:
    """An S3Store on its own client, with `slow_down` in botocore's send step.

    botocore's own retries are set to one attempt so a test does not wait out its back-off; in
    production they run first, and what reaches S3Store after them is this same ClientError.
    """
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name=server.env["AWS_DEFAULT_REGION"],
        aws_access_key_id=server.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=server.env["AWS_SECRET_ACCESS_KEY"],
        config=Config(retries={"total_max_attempts": 1}),
    )
    client.meta.events.register("before-send.s3.*", slow_down)
    return S3Store(f"s3://{BUCKET}/{prefix}", client=client)


class Setup:
    def __init__(self, server: S3Server, local: Path, prefix: str, cache_dir: Path) -> None:
        upload_folder(server.client(), local, BUCKET, prefix)
        self.slow_down = SlowDown()
        self.store = s3_store(server, prefix, slow_down=self.slow_down)
        self.new = current_version(local)
        self.old = sorted(p.name for p in (local / "versions").iterdir() if p.name != self.new)[-1]
        version = read_version(self.store, self.new)
        (self.added,) = set(version.segment_names) - set(read_version(self.store, self.old).segment_names)
        self.identity = {
            "model": version.model,
            "embedding_dim": version.embedding_dim,
            "fingerprint": version.model_fingerprint,
            "preprocessing": version.preprocessing,
        }
        # A Searcher's holdings with its real loader (download to the node cache, verify, map).
        self.searcher = SegmentHoldings(self.store, SearcherOptions(), cache_dir)

    async def prepare_searcher(self, name: str) -> int:
        return (await self.searcher.get(name)).count

    def served(self) -> ServedIndex:
        return ServedIndex(self.store, self.identity, self.prepare_searcher, None, start_retry=NO_WAIT)


@pytest.fixture
def setup(s3: S3Server, two_versions: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Setup:
    return Setup(s3, two_versions, request.node.name, tmp_path / "cache")


def version_file_of(setup: Setup) -> str:
    return version_file(setup.new)


def new_segment_index_of(setup: Setup) -> str:
    """The index file of the one segment the new version adds."""
    return f"segments/{setup.added}/index.faiss"


def test_a_slowdown_is_a_storage_error_not_an_artifact_error(setup: Setup) -> None:
    """The premise: what production raises for a throttled read, and how the serving side classifies it."""
    setup.slow_down.fail(version_file_of(setup), 2)
    with pytest.raises(StoreError, match="SlowDown"):
        setup.store.read_bytes(version_file_of(setup))
    with pytest.raises(StoreUnavailable, match="SlowDown"), io_failures_are_transient("the version file"):
        read_version(setup.store, setup.new)
    assert setup.slow_down.answered == 2


def follow(setup: Setup) -> tuple[ServedIndex, VersionFollower[Any]]:
    served = setup.served()
    # As if the Ingress had served the old version until the new one was published.
    served.book = book = VersionBook(current=asyncio.run(served.prepare(setup.old)))

    async def read() -> str:
        return setup.new

    return served, VersionFollower(book, read, served.prepare)


@pytest.mark.parametrize("what", [version_file_of, new_segment_index_of], ids=["version file", "segment index"])
def test_a_slowdown_on_a_new_version_is_retried_and_the_version_then_serves(
    setup: Setup, what: Callable[[Setup], str]
) -> None:
    served, follower = follow(setup)
    setup.slow_down.fail(what(setup), 2)

    async def polls() -> list[str]:
        return [await follower.poll_once() for _ in range(3)]

    assert asyncio.run(polls()) == ["retry", "retry", "switched"]
    assert setup.slow_down.answered == 2
    assert served.current.name == setup.new and not served.describe()["refused_versions"]


def test_a_starting_ingress_retries_current_instead_of_falling_back_to_an_older_version(setup: Setup) -> None:
    setup.slow_down.fail(version_file_of(setup), 2)
    served = setup.served()
    assert asyncio.run(served.start()).name == setup.new
    assert setup.slow_down.answered == 2 and not served.describe()["refused_versions"]


def test_a_start_that_cannot_read_current_gives_up_with_the_reason_and_serves_nothing_older(setup: Setup) -> None:
    setup.slow_down.fail(version_file_of(setup), 1_000)
    served = setup.served()
    with pytest.raises(StoreUnavailable, match=r"gave up .* after 4 attempts: .*SlowDown.*reachable"):
        asyncio.run(served.start())
    assert setup.slow_down.answered == NO_WAIT.attempts
    assert served.book is None  # it did not fall back to the older version


def test_a_broken_version_is_still_refused_and_the_start_falls_back(setup: Setup) -> None:
    """The other side of the line: a checksum mismatch is a refusal, not a retry."""
    key = new_segment_index_of(setup)
    data = bytearray(setup.store.read_bytes(key))
    data[len(data) // 2] ^= 0xFF
    setup.store.write_bytes(key, bytes(data))
    served = setup.served()
    assert asyncio.run(served.start()).name == setup.old
    assert served.describe()["refused_versions"] == [setup.new]


def test_the_searcher_preloader_retries_a_version_it_could_not_read(setup: Setup) -> None:
    setup.slow_down.fail(new_segment_index_of(setup), 1)

    async def read() -> str:
        return setup.new

    preloader = Preloader(setup.searcher, read)

    async def polls() -> list[str | None]:
        return [await preloader.preload_once(), await preloader.preload_once()]

    assert asyncio.run(polls()) == [None, setup.new]
    assert setup.slow_down.answered == 1 and not preloader.failed


def test_an_unreadable_version_is_never_an_artifact_error_on_the_searcher(setup: Setup) -> None:
    setup.slow_down.fail(new_segment_index_of(setup), 1)
    with pytest.raises(StoreUnavailable) as caught:
        asyncio.run(setup.searcher.get(setup.new))
    assert not isinstance(caught.value, ArtifactError)
