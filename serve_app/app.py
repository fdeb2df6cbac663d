"""The application graph, built in one place: `serve_app.app:build_app` in serve_config.yaml."""

from typing import Any, cast

from ray.serve import Application, Deployment

from image_search.artifact import version_manifest
from image_search.compatibility import check_compatible
from image_search.errors import ArtifactError
from image_search.manifest import Manifest
from image_search.segments import Version, read_current_version, segment_folder, store_sha256
from image_search.storage import Store, StoreError, open_store
from serve_app.config import AppArgs
from serve_app.deployments.embedder import Embedder
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.searcher import Searcher
from serve_app.deployments.writer import Writer
from serve_app.writes.routes import load_tokens

# How often Serve's controller calls each replica's health check. A killed replica is noticed at
# its next check, so /healthz says "ok" for up to this long (plus health_status_ttl_s) after a
# replica dies (issue 21: 7.5 s with Serve's default of 10 s). The checks are cheap (the Searcher's
# runs one search); a config's `deployments:` entry may still set another period.
HEALTH_CHECK_PERIOD_S = 2.0


def check_model_dim(model: str, manifest: Manifest) -> None:
    """Fail the deploy at once (not after 20 replica retries) when the index's dim cannot fit the model."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except OSError:
        return  # the Embedder reports an unloadable model with its own message
    dim = getattr(config, "projection_dim", None)
    if dim is not None:
        check_compatible(manifest, model_name=model, embedding_dim=int(dim))


def check_published(store: Store) -> Version:
    """The deploy-time check of CURRENT's version: its version file parses and every file of its
    segments matches its sha256 (streamed, never held in memory; on S3 nothing is cached)."""
    try:
        version = read_current_version(store)
        if version is None:
            raise ArtifactError(
                f"no published index at {store.uri}: build one with `python -m index_builder --images SRC --out DST`"
            )
        for segment in version.segments:
            for file, info in segment.files.items():
                if store_sha256(store, f"{segment_folder(segment.name)}/{file}") != info.sha256:
                    raise ArtifactError(
                        f"{segment_folder(segment.name)}/{file} at {store.uri} is corrupt: its checksum does not "
                        "match the version file; rebuild it with `python -m index_builder ... --full`"
                    )
    except StoreError as exc:
        raise ArtifactError(f"the index at {store.uri} is incomplete: {exc}") from exc
    return version


# No `from __future__ import annotations` here: Ray validates the config's `args` into the
# builder's pydantic annotation only when it is a real class, not a string.
def build_app(args: AppArgs) -> Application:
    if not isinstance(args, AppArgs):  # called directly with a plain dict
        args = AppArgs.model_validate(cast(dict[str, Any], args))
    return build_graph(args)


def build_graph(args: AppArgs, deployment_options: dict[str, dict[str, Any]] | None = None) -> Application:
    """The graph; `deployment_options` (by deployment name) does in code what a config's `deployments:` does."""
    options = deployment_options or {}
    store = open_store(args.index)
    # Checked here, before any replica starts, so an index of another format or dimension fails the
    # deploy at once with its reason instead of after a round of replica restarts (Searchers verify
    # each segment's checksum as they load it). No version is pinned: replicas start on whatever
    # CURRENT names when they start, and the Ingress follows later publishes (serve_app/versions.py).
    version = check_published(store)
    check_model_dim(args.model, version_manifest(version, ()))

    def deployment(cls: object, name: str) -> Deployment:
        # @serve.deployment turns the classes into Deployments; type checkers still see the classes.
        return cast(Deployment, cls).options(
            **{"health_check_period_s": HEALTH_CHECK_PERIOD_S, **options.get(name, {})}
        )

    embedder = deployment(Embedder, "Embedder").bind(args.model, args.embedder)
    searchers = [
        # A shard's deployment takes the options given for "Searcher", then its own name's.
        cast(Deployment, Searcher)
        .options(
            name=name,
            **{"health_check_period_s": HEALTH_CHECK_PERIOD_S, **options.get("Searcher", {}), **options.get(name, {})},
        )
        .bind(store.uri, args.searcher, args.cache_dir, args.reload_interval_s, shard)
        for shard, name in enumerate(searcher_names(args.searcher.shards))
    ]
    # The Writer runs only when writes are on (a token configured); a bad token file fails the deploy here.
    writer = deployment(Writer, "Writer").bind(embedder, args, store.uri) if load_tokens(args.writes).write else None
    return deployment(Ingress, "Ingress").bind(embedder, searchers, args, store.uri, writer)


def searcher_names(shards: int) -> list[str]:
    """The Searcher deployments' names: `Searcher` alone, or `Searcher_0` .. `Searcher_{N-1}` for N shards
    (the names a config's `deployments:` entries use to size each shard)."""
    return ["Searcher"] if shards == 1 else [f"Searcher_{shard}" for shard in range(shards)]
