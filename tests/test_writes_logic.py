"""Pure pieces of the write routes: batch planning, tokens, keys, group commit (no Ray, no store)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
from pathlib import Path

import pytest

from image_search.manifest import ImageRecord
from serve_app.writes import auth
from serve_app.writes.auth import TokenConfigError, Tokens, bearer_token, load_token
from serve_app.writes.commit import CommitResult
from serve_app.writes.errors import InvalidKey, Unauthorized, WritesDisabled
from serve_app.writes.group import GroupCommit
from serve_app.writes.keys import check_key, default_key
from serve_app.writes.plan import LiveState, Op, Outcome, Put, Remove, plan_batch
from tests.support import synthetic_image

TOKEN = "0123456789abcdef0123"


def put(key: str, data: bytes) -> Put:
    return Put(key, data, hashlib.sha256(data).hexdigest())


def state() -> LiveState:
    records = [
        ("s1", ImageRecord(0, "a.jpg", 1, hashlib.sha256(b"a").hexdigest())),
        ("s1", ImageRecord(1, "b.jpg", 1, hashlib.sha256(b"b").hexdigest())),
        ("s2", ImageRecord(5, "c.jpg", 1, hashlib.sha256(b"c").hexdigest())),
    ]
    return LiveState.from_segments("v1", 7, records)


def statuses(outcomes: list[Outcome]) -> list[tuple[str, int, str | None]]:
    return [(o.status, o.id, o.key) for o in outcomes]


# --- planning ---------------------------------------------------------------------------------------------


def test_new_keys_get_new_ids_from_next_id_and_replaced_keys_keep_theirs() -> None:
    plan = plan_batch(state(), [put("new.jpg", b"n"), put("b.jpg", b"B2"), put("a.jpg", b"a")])
    assert statuses(plan.outcomes) == [("added", 7, "new.jpg"), ("replaced", 1, "b.jpg"), ("unchanged", 0, "a.jpg")]
    assert plan.dead == {"s1": {1}}  # b's old vector dies in its segment; a is untouched
    assert sorted(plan.puts) == ["b.jpg", "new.jpg"] and plan.state.next_id == 8


def test_a_delete_kills_the_vector_and_the_key_and_a_later_put_of_that_key_is_a_new_id() -> None:
    plan = plan_batch(state(), [Remove(5), Remove(5), put("c.jpg", b"c"), Remove(99)])
    assert statuses(plan.outcomes) == [
        ("deleted", 5, "c.jpg"),
        ("not_found", 5, None),
        ("added", 7, "c.jpg"),  # ids are never reused, not even for the same key and bytes
        ("not_found", 99, None),
    ]
    assert plan.dead == {"s2": {5}} and plan.removed_keys == set() and list(plan.puts) == ["c.jpg"]


def test_the_same_key_twice_in_one_batch_means_what_two_requests_would() -> None:
    plan = plan_batch(state(), [put("x.jpg", b"1"), put("x.jpg", b"1"), put("x.jpg", b"2"), Remove(7)])
    assert statuses(plan.outcomes) == [
        ("added", 7, "x.jpg"),
        ("unchanged", 7, "x.jpg"),
        ("replaced", 7, "x.jpg"),
        ("deleted", 7, "x.jpg"),
    ]
    # Never stored, then removed: nothing to write, no stored vector to kill, the key leaves the store.
    assert plan.puts == {} and plan.dead == {} and plan.removed_keys == {"x.jpg"} and plan.state.next_id == 8


def test_a_batch_of_unchanged_puts_changes_nothing() -> None:
    plan = plan_batch(state(), [put("a.jpg", b"a"), Remove(42)])
    assert not plan.changes_anything


# --- tokens -------------------------------------------------------------------------------------------------


def test_the_token_comes_from_the_file_else_the_environment_else_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(auth.WRITE_TOKEN_ENV, raising=False)
    assert load_token(None, auth.WRITE_TOKEN_ENV) is None
    monkeypatch.setenv(auth.WRITE_TOKEN_ENV, f"  {TOKEN}\n")
    assert load_token(None, auth.WRITE_TOKEN_ENV) == TOKEN
    (tmp_path / "token").write_text("file-token-0123456789\n")
    assert load_token(str(tmp_path / "token"), auth.WRITE_TOKEN_ENV) == "file-token-0123456789"
    with pytest.raises(TokenConfigError, match="cannot read the token file"):
        load_token(str(tmp_path / "missing"), auth.WRITE_TOKEN_ENV)
    (tmp_path / "short").write_text("abc")
    with pytest.raises(TokenConfigError, match="at least 16 characters"):
        load_token(str(tmp_path / "short"), auth.WRITE_TOKEN_ENV)


def test_writes_are_off_without_a_token_and_need_the_right_bearer_token() -> None:
    with pytest.raises(WritesDisabled):
        Tokens().check_write(f"Bearer {TOKEN}")
    tokens = Tokens(write=TOKEN)
    for header in (None, "", TOKEN, f"Basic {TOKEN}", "Bearer wrong-token-0000000000", f"Bearer {TOKEN}x"):
        with pytest.raises(Unauthorized) as caught:
            tokens.check_write(header)
        assert caught.value.headers == {"WWW-Authenticate": "Bearer"} and TOKEN not in caught.value.message
    tokens.check_write(f"Bearer {TOKEN}")
    tokens.check_write(f"bearer   {TOKEN} ")
    assert TOKEN not in repr(tokens)


def test_tokens_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    Tokens(write=TOKEN).check_write(f"Bearer {TOKEN}")
    assert calls == [(TOKEN.encode(), TOKEN.encode())]


def test_reads_are_open_unless_a_read_token_is_set_and_the_write_token_reads_too() -> None:
    Tokens(write=TOKEN).check_read(None)
    tokens = Tokens(write=TOKEN, read="read-token-0123456789")
    tokens.check_read("Bearer read-token-0123456789")
    tokens.check_read(f"Bearer {TOKEN}")
    with pytest.raises(Unauthorized):
        tokens.check_read(None)
    assert bearer_token("Bearer   ") is None


# --- keys ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["", "/abs.jpg", "a/../b.jpg", "a//b.jpg", ".hidden/x.jpg", "a/.x.jpg", "noext", "a.txt", "a\\b.jpg"]
)
def test_keys_the_builder_would_not_list_the_same_are_refused(key: str) -> None:
    with pytest.raises(InvalidKey):
        check_key(key)


def test_the_default_key_is_content_addressed_with_the_real_format() -> None:
    import io

    buffer = io.BytesIO()
    synthetic_image(3).save(buffer, format="PNG")
    data = buffer.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    assert default_key(sha, data, "photo.jpg") == f"uploads/{sha[:32]}.png"  # the bytes say PNG, not the name
    assert check_key(default_key(sha, data, "photo.jpg")) and check_key("products/123.JPG")


# --- group commit -------------------------------------------------------------------------------------------


def test_writes_arriving_during_a_commit_are_committed_together_by_the_next() -> None:
    first_started, release = threading.Event(), threading.Event()
    batches: list[list[Op]] = []

    def commit(ops: list[Op]) -> CommitResult:
        batches.append(ops)
        if len(batches) == 1:
            first_started.set()
            assert release.wait(30)
        return CommitResult([Outcome("deleted", op.id, None) for op in ops if isinstance(op, Remove)], "v")

    async def scenario() -> list[tuple[list[Outcome], str]]:
        group = GroupCommit(commit, max_ops=100)
        first = asyncio.ensure_future(group.submit([Remove(0)]))
        assert await asyncio.to_thread(first_started.wait, 30)
        rest = [asyncio.ensure_future(group.submit([Remove(i), Remove(100 + i)])) for i in range(1, 6)]
        await asyncio.sleep(0)  # let every submit enqueue (no timing: they run before the gate opens)
        release.set()
        return list(await asyncio.gather(first, *rest))

    answers = asyncio.run(scenario())
    assert [len(ops) for ops in batches] == [1, 10]  # 5 requests, one commit
    assert [[o.id for o in outcomes] for outcomes, _ in answers] == [[0]] + [[i, 100 + i] for i in range(1, 6)]


def test_a_failed_commit_fails_every_request_of_its_batch_and_the_next_batch_runs() -> None:
    calls = []

    def commit(ops: list[Op]) -> CommitResult:
        calls.append(len(ops))
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        return CommitResult([Outcome("deleted", 0, None)] * len(ops), "v2")

    async def scenario() -> None:
        group = GroupCommit(commit, max_ops=10)
        with pytest.raises(RuntimeError, match="disk on fire"):
            await group.submit([Remove(0)])
        assert (await group.submit([Remove(0)]))[1] == "v2"

    asyncio.run(scenario())


def test_with_a_read_token_reads_need_it_but_health_and_writes_are_left_to_their_own_checks() -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from serve_app.writes.auth import ReadTokenMiddleware

    async def ok(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    routes = [Route("/search", ok, methods=["POST"]), Route("/healthz", ok), Route("/images", ok, methods=["POST"])]
    app = Starlette(routes=routes)
    app.add_middleware(ReadTokenMiddleware, tokens=Tokens(write=TOKEN, read="read-token-0123456789"))
    client = TestClient(app)
    denied = client.post("/search")
    assert denied.status_code == 401 and denied.headers["WWW-Authenticate"] == "Bearer"
    assert client.post("/search", headers={"Authorization": "Bearer read-token-0123456789"}).status_code == 200
    assert client.get("/healthz").status_code == 200 and client.post("/images").status_code == 200
    open_app = Starlette(routes=routes)
    open_app.add_middleware(ReadTokenMiddleware, tokens=Tokens(write=TOKEN))
    assert TestClient(open_app).post("/search").status_code == 200


def test_a_poll_that_read_current_before_a_write_switched_does_not_switch_back() -> None:
    from serve_app.versions import ServedVersion, VersionBook, VersionFollower

    book: VersionBook[str] = VersionBook(current=ServedVersion("v1", "m1"))
    preparing, release = asyncio.Event(), asyncio.Event()

    async def read_current() -> str:
        return "v2"  # read before the write's commit made v3

    async def prepare(name: str) -> ServedVersion[str]:
        preparing.set()
        await release.wait()
        return ServedVersion(name, "m")

    async def scenario() -> str:
        follower = VersionFollower(book, read_current, prepare)
        poll = asyncio.ensure_future(follower.poll_once())
        await preparing.wait()
        book.switch(ServedVersion("v3", "m3"))  # the Ingress serves its write's version meanwhile
        release.set()
        return await poll

    assert asyncio.run(scenario()) == "unchanged" and book.current.name == "v3"
