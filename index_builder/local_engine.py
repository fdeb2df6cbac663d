"""The single-machine build: read + decode + crop in worker processes, a bounded distance ahead of the model.

One core decodes and crops a 640x480 photo in ~3.4 ms (~300 img/s), and threads stop scaling at a
few cores (the GIL around Pillow's Python-level work: 16 threads reached 1,830 img/s where 16
processes reached 4,500, issue 10), far below what a GPU embeds. So the crops are made by a pool of
processes (default: all cores but one, which is left to the model's thread), in chunks of a few
images (one round trip per chunk, not per image), and handed to the model in collection order.
At most BATCHES_AHEAD batches beyond the one being embedded are submitted or waiting, which bounds
the memory whatever the collection's size (a 224x224 crop is 150 KB: about 4 batches, 150 MB at
--batch-size 256, 20 MB at the default 32).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from itertools import islice

import numpy as np

from image_search.errors import ClientError
from image_search.manifest import ImageRecord
from image_search.preprocessing import PreprocessSpec, pixels_from_bytes
from image_search.storage import Store, StoreError, open_store

# Images per task sent to a worker: large enough that the round trip (~0.1-0.3 ms) is small
# against the work (~3 ms per image), small enough that the pool stays busy near the end.
CHUNK_IMAGES = 8
# Batches prepared or being prepared beyond the one the model is embedding (memory bound).
BATCHES_AHEAD = 2
# How often a worker checks that the builder still runs (how long it may outlive a killed one).
WATCHDOG_PERIOD_S = 1.0


def default_workers(cpu_count: int | None = None) -> int:
    """All cores but one: the model's thread (a GPU's feeder, or torch's own threads) needs one."""
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return max(1, cores - 1)


@dataclass(frozen=True)
class Prepared:
    key: str
    record: ImageRecord | None
    pixels: np.ndarray | None
    error: str | None
    unreadable: bool = False  # the error is the store's (I/O), not the file's content


def prepare_one(store: Store, key: str, spec: PreprocessSpec) -> Prepared:
    """Read and preprocess one image; a failure is reported, never raised (one bad file is not fatal)."""
    try:
        data = store.read_bytes(key)
    except StoreError as exc:
        return Prepared(key, None, None, str(exc), unreadable=True)
    try:
        pixels = pixels_from_bytes(data, spec, filename=key)
    except ClientError as exc:
        return Prepared(key, None, None, str(exc))
    # The id is given by the build (index_builder.diff.assign_ids), the mtime from its listing.
    record = ImageRecord(id=-1, key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    return Prepared(key, record, pixels, None)


# This module is what a worker process imports (with the main module, see benchmarks/gpu.py): it
# stays free of torch and faiss, so a pool starts in a fraction of a second.
#
# Each worker process opens the store once (an S3 client does not pickle, and making one per
# task would cost more than the task).
_worker_store: Store | None = None


def _exit_with(builder_pid: int) -> None:
    """Ends this worker when the builder is gone (killed, say): a pool worker blocked on its task
    queue would otherwise wait forever, since it holds that queue's write end itself."""
    while True:
        time.sleep(WATCHDOG_PERIOD_S)
        try:
            os.kill(builder_pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:  # the pid was reused by someone else's process: ours is gone
            os._exit(1)


def _open_worker_store(uri: str, environment: dict[str, str] | None = None, builder_pid: int | None = None) -> None:
    global _worker_store
    # Ctrl-C in a terminal reaches the whole process group: the builder handles it (one line, exit
    # 130) and stops the pool; a worker interrupted mid-task would only add a traceback. (Only a
    # process's main thread may set handlers; the tests' thread-pool stand-in runs this elsewhere.)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if builder_pid is not None:
        threading.Thread(target=_exit_with, args=(builder_pid,), daemon=True, name="builder-watchdog").start()
    if environment is not None:
        # A worker forks from the fork server, which kept the environment of when it started
        # (maybe an earlier build's); the store must see this build's (AWS_*, endpoint, proxy).
        os.environ.clear()
        os.environ.update(environment)
    _worker_store = open_store(uri)


def _prepare_chunk(keys: Sequence[str], spec: PreprocessSpec) -> list[Prepared]:
    if _worker_store is None:
        raise RuntimeError("the worker's store was not opened")
    return [prepare_one(_worker_store, key, spec) for key in keys]


def _started() -> None:
    """A task that only proves its worker has started."""


def _start_every_worker(pool: Executor, workers: int) -> None:
    """Start the pool's workers before any work, with Ctrl-C held back until they have.

    A worker still being handed over by the fork server when the builder exits prints a traceback
    from inside multiprocessing (its semaphore is gone); started workers just end with the pool.
    Submitting one task per worker while none is idle starts them all. (A handler, not a signal
    mask: the kernel may deliver SIGINT to any thread, such as the progress bar's.)
    """
    interrupted: list[int] = []
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = (
        signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum)) if in_main_thread else None
    )
    try:
        for future in [pool.submit(_started) for _ in range(workers)]:
            future.result()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt


def _chunks(keys: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(keys), size):
        yield keys[start : start + size]


def _pool_context() -> multiprocessing.context.BaseContext:
    # forkserver/spawn, not fork: the parent holds torch's thread pools (and maybe a CUDA context
    # or Ray's threads), which a forked child would inherit half-initialised.
    if "forkserver" in multiprocessing.get_all_start_methods():
        forkserver = multiprocessing.get_context("forkserver")
        # Workers fork from a server that imported this module once, instead of each importing it.
        forkserver.set_forkserver_preload([__name__])
        return forkserver
    return multiprocessing.get_context("spawn")


def start_workers_early() -> None:
    """Start the fork server now (a fresh interpreter importing this module: ~0.3-0.7 s), so that
    it starts while the caller loads the model instead of after."""
    context = _pool_context()
    if context.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _process_pool(store: Store, workers: int) -> Executor:
    context = _pool_context()
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_open_worker_store,
        initargs=(store.uri, dict(os.environ), os.getpid()),
    )


def prepared_in_order(
    store: Store, keys: Sequence[str], spec: PreprocessSpec, workers: int, window: int
) -> Generator[Prepared, None, None]:
    """Every key's Prepared, in order; at most `window` images submitted and not yet consumed.

    `workers` 0 prepares in this process (no pool), which is the reference the pool is tested against.
    """
    if workers <= 0:
        for key in keys:
            yield prepare_one(store, key, spec)
        return
    chunk = max(1, min(CHUNK_IMAGES, window // max(1, 2 * workers)))
    with _process_pool(store, workers) as pool:
        _start_every_worker(pool, workers)
        pending: deque[Future[list[Prepared]]] = deque()
        in_flight = 0
        chunks = _chunks(keys, chunk)
        exhausted = False
        while True:
            while not exhausted and in_flight < window:
                next_chunk = next(chunks, None)
                if next_chunk is None:
                    exhausted = True
                    break
                pending.append(pool.submit(_prepare_chunk, next_chunk, spec))
                in_flight += len(next_chunk)
            if not pending:
                return
            done = pending.popleft().result()
            in_flight -= len(done)
            yield from done


def embed_local(
    store: Store,
    keys: Sequence[str],
    spec: PreprocessSpec,
    encode: Callable[[list[np.ndarray]], np.ndarray],
    batch_size: int,
    workers: int = 2,
    on_progress: Callable[[int], None] = lambda n: None,
) -> tuple[list[ImageRecord], np.ndarray, list[tuple[str, str]]]:
    """Embed `keys` in order; returns the records and vectors of the good ones and the skipped ones.

    `workers` decoding processes (0: decode in this process); `encode` takes a list of (H, W, 3) uint8 crops.
    A file that does not decode is skipped; one that cannot be read raises StoreError: an I/O error
    says nothing about the image, and skipping it would drop it from the index (retiring its id).
    """
    records: list[ImageRecord] = []
    vectors: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    window = (1 + BATCHES_AHEAD) * batch_size
    with closing(prepared_in_order(store, keys, spec, workers, window)) as stream:
        while current := list(islice(stream, batch_size)):
            if unreadable := next((item for item in current if item.unreadable), None):
                raise StoreError(f"{unreadable.error}; nothing was published (rerun once it reads again)")
            good = [item for item in current if item.pixels is not None]
            skipped.extend((item.key, item.error or "unreadable") for item in current if item.pixels is None)
            if good:
                # The crops as a list: the encoder stacks them once, straight into its (pinned) input buffer.
                vectors.append(encode([item.pixels for item in good if item.pixels is not None]))
                records.extend(item.record for item in good if item.record is not None)
            on_progress(len(current))
    dim_vectors = np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
    return records, dim_vectors, skipped
