"""The index artifact on a store: versioned folders plus a pointer written last.

Layout under the builder's `--out` location:

    versions/<version>/index.faiss
    versions/<version>/manifest.json
    CURRENT                      <- the name of the published version, one line

A build writes a new version folder, re-reads and checks it, and only then replaces CURRENT
(an atomic rename locally, a single PUT on S3). A crash at any point leaves the previous
CURRENT, and so the previous artifact, untouched. A location that directly holds manifest.json
and index.faiss (a plain artifact folder) is read as well.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import dataclass

import faiss

from image_search.errors import ArtifactError
from image_search.faiss_index import deserialize_index
from image_search.manifest import Manifest
from image_search.storage import Store, StoreError

logger = logging.getLogger(__name__)

POINTER = "CURRENT"
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
VERSIONS = "versions"
KEEP_VERSIONS = 3


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_version_name() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def publish(store: Store, index_bytes: bytes, manifest: Manifest) -> str:
    """Write a new version, verify it by reading it back, then point CURRENT at it."""
    version = new_version_name()
    folder = f"{VERSIONS}/{version}"
    manifest_text = manifest.to_json()
    store.write_bytes(f"{folder}/{INDEX_FILE}", index_bytes)
    store.write_bytes(f"{folder}/{MANIFEST_FILE}", manifest_text.encode())
    # What a reader will load must be what we meant to write (FAISS reports a failed close only on stderr).
    _verify(store, folder, expected_sha256=manifest.index_sha256, expected_manifest=manifest_text)
    store.write_bytes(POINTER, (version + "\n").encode())
    _prune_old_versions(store, keep={version})
    return version


def _verify(store: Store, folder: str, expected_sha256: str, expected_manifest: str) -> None:
    written = store.read_bytes(f"{folder}/{INDEX_FILE}")
    if sha256_hex(written) != expected_sha256:
        raise ArtifactError(f"{store.uri}/{folder}/{INDEX_FILE} does not read back as written")
    if store.read_bytes(f"{folder}/{MANIFEST_FILE}").decode() != expected_manifest:
        raise ArtifactError(f"{store.uri}/{folder}/{MANIFEST_FILE} does not read back as written")
    deserialize_index(written)


def _prune_old_versions(store: Store, keep: set[str]) -> None:
    """Keep the newest few versions so a reader that resolved CURRENT a moment ago still finds its files."""
    try:
        versions = sorted({key.split("/")[1] for key in store.iter_keys() if key.startswith(f"{VERSIONS}/")})
    except StoreError:
        return
    for old in versions[:-KEEP_VERSIONS]:
        if old not in keep:
            store.delete_prefix(f"{VERSIONS}/{old}")


@dataclass(frozen=True)
class LoadedArtifact:
    manifest: Manifest
    index: faiss.Index
    location: str  # the concrete version folder it was read from


def resolve_version(store: Store) -> str:
    """The folder (relative to the store) holding the artifact to read."""
    if store.exists(POINTER):
        version = store.read_bytes(POINTER).decode().strip()
        if not version or "/" in version or version.startswith("."):
            raise ArtifactError(f"{store.uri}/{POINTER} holds an invalid version name {version!r}")
        return f"{VERSIONS}/{version}"
    if store.exists(MANIFEST_FILE):
        return ""
    raise ArtifactError(
        f"no index at {store.uri}: expected {POINTER} or {MANIFEST_FILE} there; "
        "build one with `python -m index_builder --images SRC --out DST`"
    )


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def load_manifest(store: Store, folder: str) -> Manifest:
    try:
        return Manifest.from_json(store.read_bytes(_join(folder, MANIFEST_FILE)))
    except StoreError as exc:
        raise ArtifactError(f"the index at {store.uri} is incomplete: {exc}") from exc


def read_checked_index_bytes(store: Store, folder: str, manifest: Manifest) -> bytes:
    """The index file's bytes, refused unless they are exactly what the manifest describes."""
    try:
        index_bytes = store.read_bytes(_join(folder, INDEX_FILE))
    except StoreError as exc:
        raise ArtifactError(f"the index at {store.uri} is incomplete: {exc}") from exc
    if sha256_hex(index_bytes) != manifest.index_sha256:
        raise ArtifactError(
            f"{_join(folder, INDEX_FILE)} at {store.uri} is corrupt: its checksum does not match manifest.json; "
            "rebuild the index"
        )
    return index_bytes


def load_artifact(store: Store, folder: str | None = None) -> LoadedArtifact:
    """Read and check an artifact; every inconsistency is an ArtifactError naming what is wrong."""
    folder = resolve_version(store) if folder is None else folder
    manifest = load_manifest(store, folder)
    index_bytes = read_checked_index_bytes(store, folder, manifest)
    try:
        index = deserialize_index(index_bytes)
    except RuntimeError as exc:
        raise ArtifactError(f"{_join(folder, INDEX_FILE)} at {store.uri} is not a FAISS index: {exc}") from exc
    if index.ntotal != manifest.count or index.d != manifest.embedding_dim:
        raise ArtifactError(
            f"the index at {store.uri} holds {index.ntotal} vectors of dim {index.d}, "
            f"but its manifest lists {manifest.count} of dim {manifest.embedding_dim}"
        )
    return LoadedArtifact(manifest=manifest, index=index, location=_join(store.uri, folder).rstrip("/"))
