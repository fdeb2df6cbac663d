"""The cluster build: a Ray Data pipeline, `--engine ray`.

    read_binary_files(paths, include_paths=True)        read tasks (local folder or s3://)
      -> map_batches(decode_batch)                       CPU tasks of DECODE_BATCH files, spread over the
                                                         cluster's cores: decode + resize/crop; bad files marked
      -> map_batches(EncoderActor, ActorPoolStrategy)    CLIP image tower, on a GPU per actor when the
                                                         cluster has GPUs; receives uint8 crops only
      -> collected on the driver, sorted like `discover_images`, published by `finish_build`

Only the keys the incremental plan names (`BuildPlan.diff.to_embed`) go through the pipeline; the
driver loads the vision tower once on CPU to know the model's fingerprint before planning (the
diff depends on it). The artifact is the one the local engine writes (same records, same order,
same vectors up to float rounding). Decoding happens in the UDF rather than in the read
(`read_images`) so that one corrupt file is skipped and reported instead of failing the build. On
S3, the read tasks use pyarrow's S3 filesystem, which takes credentials from the standard AWS chain
of the node it runs on (environment, ~/.aws, the instance profile) like boto3 does.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from image_search.artifact import sha256_hex
from image_search.errors import ClientError
from image_search.manifest import ImageRecord
from image_search.precision import ResolvedPrecision, host_cpu_flags, resolve_precision
from image_search.preprocessing import PreprocessSpec, pixels_from_bytes
from image_search.storage import LocalStore, S3Store, Store
from index_builder.build import BuildError, BuildReport, ModelInfo, finish_build, open_collection

Batch = dict[str, np.ndarray]

# Files per decode task: small, so decoding spreads over every CPU of the cluster (one core does
# ~300 photos/s, a GPU actor embeds thousands) instead of a few large tasks; Ray Data re-batches
# the crops to --batch-size for the encoder actors.
DECODE_BATCH = 16


def read_root(store: Store) -> str:
    """The prefix of the paths Ray Data reports for the store's files (s3: bucket/prefix/, no scheme)."""
    if isinstance(store, S3Store):
        prefix = f"{store.prefix}/" if store.prefix else ""
        return f"{store.bucket}/{prefix}"
    if isinstance(store, LocalStore):
        return f"{store.root.as_posix().rstrip('/')}/"
    raise BuildError(f"the ray engine cannot read {store.uri}")


def read_path(store: Store, key: str) -> str:
    """The location of one key, as given to `read_binary_files`."""
    if isinstance(store, S3Store):
        return f"{store.uri}/{key}"
    local = store.local_path(key)
    if local is None:
        raise BuildError(f"the ray engine cannot read {store.uri}")
    return local.as_posix()


def key_of(path: str, root: str) -> str:
    """The store key of a path Ray Data reports (`include_paths=True`)."""
    bare = path.removeprefix("s3://")
    if not bare.startswith(root):
        raise BuildError(f"Ray Data read {path!r}, which is not under {root!r}")
    return bare[len(root) :]


def decode_batch(batch: Batch, root: str, spec: PreprocessSpec) -> Batch:
    """Encoded files -> crops. A file that does not decode is kept as a row with its `error` set."""
    count = len(batch["path"])
    keys = [key_of(str(path), root) for path in batch["path"]]
    pixels = np.zeros((count, spec.crop_height, spec.crop_width, 3), dtype=np.uint8)
    sizes = np.zeros(count, dtype=np.int64)
    hashes: list[str] = []
    errors: list[str] = []
    for row, (key, raw) in enumerate(zip(keys, batch["bytes"], strict=True)):
        data = bytes(raw)
        sizes[row] = len(data)
        hashes.append(sha256_hex(data))
        try:
            pixels[row] = pixels_from_bytes(data, spec, filename=key)
            errors.append("")
        except ClientError as exc:
            errors.append(str(exc) or type(exc).__name__)
    return {
        "key": np.array(keys, dtype=object),
        "size": sizes,
        "sha256": np.array(hashes, dtype=object),
        "error": np.array(errors, dtype=object),
        "pixels": pixels,
    }


class EncoderActor:
    """One CLIP image tower per actor; the rows marked bad by `decode_batch` pass through unencoded."""

    def __init__(self, model: str, device: str, precision: str, spec: PreprocessSpec) -> None:
        from image_search.encoder import ClipImageEncoder

        self.encoder = ClipImageEncoder(model, device=device, precision=precision)  # type: ignore[arg-type]
        if self.encoder.spec != spec:
            raise BuildError(f"the encoder's preprocessing {self.encoder.spec} differs from the driver's {spec}")
        self.fingerprint = self.encoder.identity.fingerprint

    def __call__(self, batch: Batch) -> Batch:
        count = len(batch["key"])
        good = np.array([not error for error in batch["error"]], dtype=bool)
        vectors = np.zeros((count, self.encoder.embedding_dim), dtype=np.float32)
        if good.all():  # the usual case: the crops go to the encoder as they arrived, uncopied
            vectors[:] = self.encoder.encode_pixels(batch["pixels"])
        elif good.any():
            vectors[good] = self.encoder.encode_pixels(batch["pixels"][good])
        return {
            "key": batch["key"],
            "size": batch["size"],
            "sha256": batch["sha256"],
            "error": batch["error"],
            "vector": vectors,
            "fingerprint": np.array([self.fingerprint] * count, dtype=object),
        }


def plan_device(
    device: str, precision: str, cluster_gpus: float, cpu_flags: frozenset[str]
) -> tuple[str, int, ResolvedPrecision]:
    """(the encoder's device, GPUs per actor, the precision that runs). `auto` uses GPUs when the cluster has any now.

    The precision is resolved here, once, so every actor runs the same one and the driver can
    report it; on CPU actors `auto` follows the driver's CPU flags (a cluster of one node type).
    """
    use_gpu = device == "cuda" or (device == "auto" and cluster_gpus >= 1)
    if device == "cuda" and cluster_gpus < 1:
        # An autoscaling cluster adds GPU nodes for the actors' requests; a fixed one waits for them.
        print("index_builder: --device cuda: no GPU in the Ray cluster yet; waiting for one", file=sys.stderr)
    if precision == "fp16" and not use_gpu:
        raise BuildError("--precision fp16 needs a GPU and the Ray cluster has none; use auto, fp32 or bf16")
    device_type, gpus = ("cuda", 1) if use_gpu else ("cpu", 0)
    return device_type, gpus, resolve_precision(precision, device_type, cpu_flags)


def load_spec(model: str) -> PreprocessSpec:
    """The model's preprocessing, read on the driver (config files only, no weights)."""
    from transformers import AutoConfig

    from image_search.encoder import load_preprocess_spec

    try:
        AutoConfig.from_pretrained(model)
        return load_preprocess_spec(model)
    except (OSError, ValueError) as exc:
        raise BuildError(f"could not load CLIP checkpoint {model!r}: {exc}") from exc


def collect(batches: Any) -> tuple[list[ImageRecord], np.ndarray, list[tuple[str, str]], str]:
    """Rows from the pipeline -> (records, vectors, skipped, fingerprint), in `discover_images` order."""
    rows: list[tuple[str, int, str, str, np.ndarray]] = []
    fingerprints: set[str] = set()
    for batch in batches:
        fingerprints.update(str(value) for value in batch["fingerprint"])
        for key, size, sha, error, vector in zip(
            batch["key"], batch["size"], batch["sha256"], batch["error"], batch["vector"], strict=True
        ):
            rows.append((str(key), int(size), str(sha), str(error), vector))
    if len(fingerprints) > 1:
        raise BuildError(f"encoder actors disagree on the model: fingerprints {sorted(fingerprints)}")
    rows.sort(key=lambda row: row[0])
    good = [row for row in rows if not row[3]]
    records = [ImageRecord(id=-1, key=key, size=size, sha256=sha) for key, size, sha, _, _ in good]
    vectors = (
        np.stack([row[4] for row in good]).astype(np.float32, copy=False)
        if good
        else np.zeros((0, 0), dtype=np.float32)
    )
    skipped = [(key, error) for key, _, _, error, _ in rows if error]
    return records, vectors, skipped, next(iter(fingerprints), "")


def run_ray(args: argparse.Namespace, before_commit: Callable[[], None] | None = None) -> BuildReport:
    import ray
    import ray.data
    from ray.exceptions import RayError, UserCodeException

    from index_builder.options import plan_from_args

    started = time.perf_counter()
    collection = open_collection(args.images, args.out)
    source = collection.source
    spec = load_spec(args.model)
    root = read_root(source)
    started_ray = False
    if not ray.is_initialized():
        ray.init(address=args.ray_address)  # None: a local Ray; "auto": the running cluster
        started_ray = True
    try:
        # The precision that runs depends on the cluster's GPUs, and the plan on that precision
        # (another one forces a full rebuild), so Ray is joined before planning.
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        device, gpus, precision = plan_device(args.device, args.precision, cluster_gpus, host_cpu_flags())
        model = driver_model_info(args.model, precision)
        plan = plan_from_args(collection, model, args, before_commit)
        keys = list(plan.diff.to_embed)
        if not keys:  # nothing to embed
            empty = np.zeros((0, model.embedding_dim), dtype=np.float32)
            return finish_build(plan, [], empty, list(collection.skipped), started)
        print(f"encoding on {device} in {precision}, {args.actors} encoder actors")
        ray.data.DataContext.get_current().enable_progress_bars = not args.quiet
        dataset = (
            ray.data.read_binary_files([read_path(source, key) for key in keys], include_paths=True)
            .map_batches(partial(decode_batch, root=root, spec=spec), batch_size=DECODE_BATCH, num_cpus=1)
            .map_batches(
                EncoderActor,
                fn_constructor_kwargs={
                    "model": args.model,
                    "device": device,
                    "precision": precision,
                    "spec": spec,
                },
                compute=ray.data.ActorPoolStrategy(size=args.actors),
                batch_size=args.batch_size,
                num_gpus=gpus,
                # The actor only reads the crops: no defensive copy of each batch.
                zero_copy_batch=True,
            )
            .select_columns(["key", "size", "sha256", "error", "vector", "fingerprint"])
        )
        try:
            # Consumed once: a Dataset is lazy and would run again on a second pass.
            records, vectors, skipped, fingerprint = collect(dataset.iter_batches(batch_format="numpy"))
        except (RayError, UserCodeException) as exc:
            raise BuildError(f"the Ray Data build failed: {str(exc).strip().splitlines()[-1]}") from exc
    finally:
        if started_ray:
            ray.shutdown()
    if len(records) + len(skipped) != len(keys):
        raise BuildError(f"Ray Data returned {len(records) + len(skipped)} rows for {len(keys)} images")
    # The fingerprint is taken from float32 weights in every precision (image_search/encoder.py).
    if fingerprint and fingerprint != model.fingerprint:
        raise BuildError(
            f"the encoder actors loaded another model (fingerprint {fingerprint}) than the driver "
            f"({model.fingerprint}); check that every node has the same checkpoint"
        )
    if not records:
        vectors = np.zeros((0, model.embedding_dim), dtype=np.float32)
    return finish_build(plan, records, vectors, sorted([*collection.skipped, *skipped]), started)


def driver_model_info(model: str, precision: str) -> ModelInfo:
    """The model's identity, loaded once on the driver's CPU (fp16 runs only on GPUs; its fingerprint is fp32's)."""
    from image_search.encoder import ClipImageEncoder, ModelLoadError

    try:
        encoder = ClipImageEncoder(model, device="cpu", precision="fp32" if precision == "fp16" else precision)  # type: ignore[arg-type]
    except (ModelLoadError, ValueError) as exc:
        raise BuildError(str(exc)) from exc
    info = ModelInfo(
        name=model,
        fingerprint=encoder.identity.fingerprint,
        embedding_dim=encoder.embedding_dim,
        preprocessing=encoder.spec.to_dict(),
        precision=precision,
    )
    del encoder
    return info
