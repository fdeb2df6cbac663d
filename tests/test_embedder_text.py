"""The Embedder's text path without Ray: its own queue and forward passes beside the image ones.

The Embedder class is built directly (not as a Serve replica) with a tiny checkpoint; a forward
function is swapped for one held at a gate, to show that texts are answered while an image forward
pass cannot finish, and the reverse. Waiting is bounded with asyncio.wait_for, never slept.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from image_search.errors import EmptyText, TextSearchUnavailable
from serve_app.config import EmbedderOptions
from serve_app.deployments.embedder import Embedder
from tests.support import make_clip_checkpoint

BOUND_S = 60.0


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory):
    folder = make_clip_checkpoint(tmp_path_factory.mktemp("clip"))
    return Embedder.func_or_class(str(folder), EmbedderOptions(device="cpu", num_threads=1))


def gated(
    forward: Callable[[np.ndarray], np.ndarray],
) -> tuple[Callable[[np.ndarray], np.ndarray], threading.Event, threading.Event]:
    """`forward` that signals when it starts and then waits for the gate to open."""
    started, gate = threading.Event(), threading.Event()

    def held(batch: np.ndarray) -> np.ndarray:
        started.set()
        if not gate.wait(BOUND_S):
            raise TimeoutError("the gate was never opened")
        return forward(batch)

    return held, started, gate


def crop(embedder) -> np.ndarray:
    return np.zeros(embedder.input_shape, dtype=np.uint8)


def test_texts_are_answered_while_an_image_forward_pass_is_held(embedder) -> None:
    async def scenario() -> None:
        original = embedder.coalescer.forward
        held, started, gate = gated(original)
        embedder.coalescer.forward = held
        try:
            image = asyncio.ensure_future(embedder.embed(crop(embedder)))
            await asyncio.wait_for(asyncio.to_thread(started.wait, BOUND_S), BOUND_S)
            answers = await asyncio.wait_for(
                asyncio.gather(*(embedder.embed_text(f"text {i}") for i in range(8))), BOUND_S
            )
            assert all(answer["vector"].shape == (32,) for answer in answers)
            assert not image.done()  # still held: the texts did not wait for it
        finally:
            gate.set()
            embedder.coalescer.forward = original
        assert (await asyncio.wait_for(image, BOUND_S)) is not None

    asyncio.run(scenario())


def test_images_are_answered_while_a_text_forward_pass_is_held(embedder) -> None:
    async def scenario() -> None:
        original = embedder.text_coalescer.forward
        held, started, gate = gated(original)
        embedder.text_coalescer.forward = held
        try:
            text = asyncio.ensure_future(embedder.embed_text("a red bicycle"))
            await asyncio.wait_for(asyncio.to_thread(started.wait, BOUND_S), BOUND_S)
            images = await asyncio.wait_for(
                asyncio.gather(*(embedder.embed(crop(embedder)) for _ in range(4))), BOUND_S
            )
            assert all(vector is not None for vector in images)
            assert not text.done()
        finally:
            gate.set()
            embedder.text_coalescer.forward = original
        assert (await asyncio.wait_for(text, BOUND_S))["truncated"] is False

    asyncio.run(scenario())


def test_text_batch_size_follows_user_config(embedder) -> None:
    embedder.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.0, "max_text_batch_size": 3})
    assert embedder.text_coalescer.max_batch_size == 3 and embedder.coalescer.max_batch_size == 4
    with pytest.raises(ValueError, match="max_text_batch_size"):
        embedder.reconfigure({"max_text_batch_size": 0})


def test_empty_text_is_a_client_error_and_no_tower_is_unavailable(embedder, tmp_path: Path) -> None:
    with pytest.raises(EmptyText):
        asyncio.run(embedder.embed_text("  "))
    folder = make_clip_checkpoint(tmp_path, tokenizer=False)
    no_text = Embedder.func_or_class(str(folder), EmbedderOptions(device="cpu", num_threads=1))
    assert no_text.text_search() == {"available": False, "max_tokens": None}
    with pytest.raises(TextSearchUnavailable):
        asyncio.run(no_text.embed_text("a dog"))


def test_a_demo_checkpoint_is_named_as_one_and_a_real_one_by_its_name(tmp_path: Path) -> None:
    """A demo folder is called "model": /info and the page said "model model". It is named as a demo."""
    from image_search.checkpoints import DEMO_MARKER
    from serve_app.deployments.embedder import DEMO_MODEL_NAME

    folder = make_clip_checkpoint(tmp_path / "model")
    (folder / DEMO_MARKER).write_text("random weights\n")
    identity = Embedder.func_or_class(str(folder), EmbedderOptions(device="cpu", num_threads=1)).identity()
    assert (identity["name"], identity["demo"]) == (DEMO_MODEL_NAME, True)
    assert "model" not in DEMO_MODEL_NAME.split()


def test_the_text_tower_reports_the_precision_the_image_tower_runs(embedder) -> None:  # type: ignore[no-untyped-def]
    assert embedder.text_encoder.precision == embedder.encoder.precision == embedder.identity()["precision"]
