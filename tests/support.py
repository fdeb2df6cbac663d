"""Test and benchmark support: CLIP checkpoints made on the spot, generated images (both from
image_search.demo_data: no model hub is reachable here), ports, requests and sample manifests."""

from __future__ import annotations

import socket

import requests

# The checkpoints and images live in the package (scripts/make_demo_data.py uses them too).
from image_search.demo_data import (
    PREPROCESSOR_CONFIG,
    TINY,
    VIT_B_32,
    make_clip_checkpoint,
    make_clip_tokenizer,
    synthetic_image,
    write_image_folder,
)
from image_search.manifest import Manifest

__all__ = [
    "PREPROCESSOR_CONFIG",
    "TINY",
    "VIT_B_32",
    "free_port",
    "make_clip_checkpoint",
    "make_clip_tokenizer",
    "post_search",
    "sample_manifest",
    "synthetic_image",
    "write_image_folder",
]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for Serve's HTTP proxy and Ray's node ports)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post_search(
    base_url: str,
    files: list[tuple[str, bytes]],
    params: dict | None = None,
    timeout: float = 60,
    route: str = "/search",
) -> requests.Response:
    """POST photos as the page and curl do: multipart, one `files` field per photo."""
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    return requests.post(f"{base_url}{route}", files=parts, params=params, timeout=timeout)


def sample_manifest(records: tuple = (), **fields: object) -> Manifest:
    """A small valid manifest for tests of pure logic; `fields` override the defaults."""
    defaults: dict[str, object] = {
        "model": "m",
        "model_fingerprint": "f",
        "embedding_dim": 4,
        "preprocessing": {},
        "index": {"factory": "Flat", "params": {}},
        "source": "/c",
        "records": tuple(records),
        "index_sha256": "x",
        "created_at": "t",
        "next_id": max((record.id for record in records), default=-1) + 1,
    }
    return Manifest(**{**defaults, **fields})  # type: ignore[arg-type]
