"""Typed configuration of the application.

Everything a deployment needs arrives through these objects, validated once, from
serve_config.yaml `args` (or the test fixtures). Nothing else reads the environment for settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from image_search.checkpoints import DEFAULT_MODEL
from image_search.index_planner import DEFAULT_MAX_INDEX_MEMORY, parse_byte_size
from image_search.precision import Precision
from image_search.shards import MAX_SHARDS

# How often replicas read CURRENT (one small read): a publish serves within about this long.
DEFAULT_RELOAD_INTERVAL_S = 1.0
# The longest allowed; retention (image_search/artifact.py) relies on replicas reading CURRENT this often.
MAX_RELOAD_INTERVAL_S = 30.0


class UploadLimits(BaseModel):
    """Limits enforced by the Ingress before any model work. Every limit has a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_files: int = Field(default=16, ge=1, description="files per request")
    max_file_bytes: int = Field(default=10 * 1024 * 1024, ge=1, description="bytes per file")
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1, description="bytes per request body")
    max_fields: int = Field(default=32, ge=1, description="non-file form fields per request")
    max_pixels: int = Field(default=50_000_000, ge=1, description="width x height of one image")
    # Memory is what decoding costs: all files of one request together may decode to at most this many
    # pixels (after the JPEG draft; header dimensions, checked before any decode). 2 x max_pixels.
    max_request_pixels: int = Field(default=100_000_000, ge=1, description="decoded pixels per request")
    # Decodes one Ingress replica runs at once (each on a worker thread), whatever the number of
    # requests in flight: with max_request_pixels this bounds the replica's decode memory.
    max_concurrent_decodes: int = Field(default=4, ge=1, le=64, description="decodes at once per Ingress")
    max_k: int = Field(default=100, ge=1, le=1000)
    default_k: int = Field(default=5, ge=1)
    # Text queries: characters are counted before tokenising (CLIP reads 77 tokens at most; a
    # longer text is truncated and says so, but nothing needs thousands of characters).
    max_text_chars: int = Field(default=1000, ge=1, le=100_000, description="characters per text query")
    max_texts: int = Field(default=16, ge=1, description="text queries per request")
    # One Searcher call carries every query's vector and its k results, over gRPC whose messages are
    # capped at 4 MiB: 256 queries x max_k 1000 results x 12 bytes = 3 MB fits.
    max_queries: int = Field(default=16, ge=1, le=256, description="files and texts together per request")
    # dedup=true: matches at least this cosine to a better one are listed under its "duplicates".
    dedup_cosine: float = Field(default=0.95, ge=-1.0, le=1.0)

    @model_validator(mode="after")
    def _default_k_within_max(self) -> UploadLimits:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must be <= max_k ({self.max_k})")
        return self


class EmbedderOptions(BaseModel):
    """How the Embedder runs the model. Batching is set through the deployment's user_config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # auto: fp16 on a GPU, bf16 on a CPU with native bf16, fp32 otherwise (image_search/precision.py).
    precision: Precision = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # None: torch keeps the thread count Ray gave the replica (OMP_NUM_THREADS = its CPU share).
    num_threads: int | None = Field(default=None, ge=1)


class SearcherOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # FAISS threads per replica; several replicas share a machine, so one each by default.
    num_threads: int = Field(default=1, ge=1)
    # Search-time knobs of approximate indexes (ignored by exact ones).
    nprobe: int | None = Field(default=None, ge=1)
    ef_search: int | None = Field(default=None, ge=1)
    # Index versions one replica holds at once (their segments mapped, not copied, and shared between
    # versions): during a handover the old one answers the requests that started before it and the
    # new one the rest; 3 leaves room for a second publish while the first handover's requests finish.
    max_versions: int = Field(default=3, ge=2, le=16)
    # The health check runs one search on the search thread; longer than this means it is stuck.
    health_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # Shard groups a version's segments are split across (image_search/shards.py): each shard is its
    # own Searcher deployment (`Searcher_0` .. `Searcher_{N-1}`, each with its own replicas) holding
    # only its segments, and the Ingress asks every shard and merges their top-k. 1: one deployment
    # named `Searcher` holding every segment (the single-node layout).
    shards: int = Field(default=1, ge=1, le=MAX_SHARDS)
    # With shards > 1: how long the Ingress waits for each shard's answer (retries on another
    # replica included). Past it the answer is 503 shard_unavailable, or with allow_partial a 200
    # that says "partial": true and which shards are missing (/duplicates is never partial).
    shard_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    allow_partial: bool = False


class WritesOptions(BaseModel):
    """POST /images and DELETE /images/{id} (serve_app/writes/). Tokens come from files, never from here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A file holding the write token (one line). None: the IMAGE_SEARCH_WRITE_TOKEN environment
    # variable, and with neither the write routes answer 403 writes_disabled.
    token_file: str | None = Field(default=None, min_length=1)
    # Optional: a file holding a read token; then every read route but /healthz needs it (or the write token).
    # None: IMAGE_SEARCH_READ_TOKEN, and with neither reads stay open.
    read_token_file: str | None = Field(default=None, min_length=1)
    # Operations (files and deletes) committed together at most: one segment per commit.
    max_batch_ops: int = Field(default=256, ge=1, le=4096)
    # How long a commit waits for the index's commit lock (a CLI builder holds it for its whole build)
    # before answering 503 writer_busy; the S3 lease's lifetime (a dead holder blocks others this long).
    lock_wait_s: float = Field(default=10.0, ge=0, le=600)
    lock_lease_s: float = Field(default=60.0, ge=5, le=3600)
    # How long versions retired by later commits are kept (image_search/artifact.py, retention). Every
    # write commit publishes a version, so the builder's 24 h would keep tens of thousands under steady
    # writes. Replicas follow CURRENT within reload_interval_s (at most 30 s) and restart on it, hence
    # the floor; the keep-newest and newest-of-each-model rules still apply.
    retention_s: float = Field(default=3600.0, ge=120, le=30 * 24 * 3600)


class AppArgs(BaseModel):
    """The `args` of the application in serve_config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(default=DEFAULT_MODEL, description="hub id or local folder of a CLIP checkpoint")
    index: str = Field(default="data/index", description="index location written by the builder (folder or s3://)")
    limits: UploadLimits = UploadLimits()
    embedder: EmbedderOptions = EmbedderOptions()
    searcher: SearcherOptions = SearcherOptions()
    thumbnail_sizes: tuple[int, ...] = (128, 256, 512)
    # Thumbnails are cached on disk by content hash (one decode per image and size, ever), in this
    # folder (default: image_search-thumbnails in the system's temporary folder), bounded to
    # thumbnail_cache_max_bytes (least recently used files go first).
    thumbnail_cache_dir: str | None = Field(default=None, min_length=1)
    thumbnail_cache_max_bytes: int = Field(default=512 * 1024 * 1024, ge=1024 * 1024)
    # Our own end-to-end deadline per request, enforced inside the Ingress. Serve's
    # request_timeout_s can be lifted by a client (`x-request-timeout-seconds: 0` disables it);
    # this one cannot, so a slow upload or a stuck call never holds a slot longer than this.
    request_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    # How often the Ingress (and each Searcher) looks at the published version (CURRENT) and, when it
    # changed, loads, checks and switches to it without a restart. Reading CURRENT is one small read,
    # so a publish serves within about a second. Following cannot be turned off: the builder's
    # retention deletes retired versions on the promise that every replica looks at CURRENT at least
    # this often (at most 30 s), so a replica that stopped following could lose the version it serves.
    reload_interval_s: float = Field(default=DEFAULT_RELOAD_INTERVAL_S)
    # Where the collection's images live now (folder or s3://); default: where the index was built
    # (the manifest's `source`). /images/{id} reads `<images>/<key>`.
    images: str | None = Field(default=None, min_length=1)
    # Per-node folder for S3 index segments (downloaded once per node, verified, then mapped; a
    # Searcher drops those no version still in the store names, serve_app/segment_cache.py);
    # default: image_search-index-cache in the system's temporary folder.
    cache_dir: str | None = Field(default=None, min_length=1)
    # /healthz reads Serve's status at most this often (it asks Serve's controller each time).
    health_status_ttl_s: float = Field(default=1.0, ge=0, le=60)
    # How long an Ingress replica waits at start for the Embedder to load its model and answer (and,
    # as long again, for a Searcher to load the index). Past it the replica fails (and Serve retries
    # it) with a log line naming what it waited for.
    startup_timeout_s: float = Field(default=600.0, gt=0, le=3600)
    writes: WritesOptions = WritesOptions()
    # The index planner's memory budget per segment (as the builder's --max-index-memory), for the
    # compactions the Writer runs after API writes: bytes, or "512MiB", "16GiB". (A commit's own
    # segment holds at most writes.max_batch_ops vectors: always exact.)
    max_index_memory: int = Field(default=DEFAULT_MAX_INDEX_MEMORY, gt=0)

    @field_validator("max_index_memory", mode="before")
    @classmethod
    def _byte_size(cls, value: object) -> int:
        if isinstance(value, int | str):
            return parse_byte_size(value)
        raise ValueError(f"max_index_memory must be bytes or a size such as 4GiB, not {value!r}")

    @field_validator("reload_interval_s")
    @classmethod
    def _following_is_on(cls, value: float) -> float:
        if not 0 < value <= MAX_RELOAD_INTERVAL_S:
            raise ValueError(
                f"reload_interval_s must be above 0 and at most {MAX_RELOAD_INTERVAL_S:g} s (got {value:g}): the "
                "service always follows CURRENT, because retention deletes old versions on the promise that "
                f"replicas look at CURRENT that often; set it to {DEFAULT_RELOAD_INTERVAL_S:g} (the default) or "
                "leave it out. To keep serving one version, stop publishing to that index (or serve a copy)."
            )
        return value


class BatchingConfig(BaseModel):
    """The Embedder deployment's `user_config` (key names are a contract)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(default=16, ge=1, le=256)
    # How long an idle Embedder waits for company before it starts a forward pass. Under load
    # batches form anyway (requests that arrive during a forward pass join the next one, see
    # serve_app/coalescing.py), so the default adds no latency to a lone request.
    batch_wait_timeout_s: float = Field(default=0.0, ge=0.0, le=10.0)
    # Text queries have their own queue and forward passes (a text forward pass costs a fraction of
    # an image one, so its batches may be larger).
    max_text_batch_size: int = Field(default=64, ge=1, le=1024)


def check_batch_fits_concurrency(max_batch_size: int, max_ongoing_requests: int | None) -> None:
    """A batch only holds requests in flight: a max_batch_size above max_ongoing_requests is never reached."""
    if max_ongoing_requests is not None and max_batch_size > max_ongoing_requests:
        raise ValueError(
            f"Embedder user_config max_batch_size ({max_batch_size}) is larger than its max_ongoing_requests "
            f"({max_ongoing_requests}), so no batch could ever be that large; raise max_ongoing_requests "
            "or lower max_batch_size in serve_config.yaml"
        )
