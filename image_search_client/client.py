"""The HTTP client: one method per route, the server's JSON in and out, its errors as ClientError.

Queries name either a photo (a path that exists) or a text (anything else), as on the command line.
Every call has a timeout; nothing is retried behind the caller's back (writes are not idempotent
in general, and a search the caller gave up on should not run twice).
"""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import requests

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 60.0
WRITE_TOKEN_ENV = "IMAGE_SEARCH_WRITE_TOKEN"
READ_TOKEN_ENV = "IMAGE_SEARCH_READ_TOKEN"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class ClientError(Exception):
    """The server refused a request (or could not be reached); `message` is the server's own text."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


@dataclass(frozen=True)
class WeightedQuery:
    """One query of a combined search: a photo path or a text, and its weight (negative: "less like this")."""

    query: str
    weight: float = 1.0

    @property
    def is_photo(self) -> bool:
        return is_photo(self.query)


def is_photo(query: str) -> bool:
    """A query that names an existing file is a photo; anything else is a text."""
    return Path(query).expanduser().is_file()


def image_files(paths: Sequence[str]) -> Iterator[Path]:
    """Files to upload: each file given, and the image files under each folder given (sorted, recursively)."""
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                        yield Path(root) / name
        elif path.is_file():
            yield path
        else:
            raise ClientError(f"{raw}: no such file or folder")


def _content_type(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


class ImageSearchClient:
    def __init__(
        self,
        url: str = DEFAULT_URL,
        write_token: str | None = None,
        read_token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        session: requests.Session | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.write_token = write_token if write_token is not None else os.environ.get(WRITE_TOKEN_ENV)
        self.read_token = read_token if read_token is not None else os.environ.get(READ_TOKEN_ENV)
        self.timeout_s = timeout_s
        self.session = session or requests.Session()

    # --- transport ------------------------------------------------------------------------------

    def _headers(self, write: bool) -> dict[str, str]:
        token = self.write_token if write else self.read_token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _request(self, method: str, path: str, *, write: bool = False, **kwargs: Any) -> Any:
        try:
            response = self.session.request(
                method, self.url + path, headers=self._headers(write), timeout=self.timeout_s, **kwargs
            )
        except requests.RequestException as exc:
            raise ClientError(f"cannot reach {self.url}: {exc}") from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            error = body.get("error") if isinstance(body, dict) else None
            if isinstance(error, dict):
                raise ClientError(str(error.get("message")), response.status_code, error.get("code"))
            raise ClientError(f"{method} {path}: HTTP {response.status_code}", response.status_code)
        if body is None:
            raise ClientError(f"{method} {path}: the server did not answer JSON (HTTP {response.status_code})")
        return body

    # --- routes ---------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return dict(self._request("GET", "/info"))

    def search(self, queries: Sequence[str], k: int = 5, prefixes: Sequence[str] = ()) -> dict[str, Any]:
        """One result list per query (photos first, then texts, as the server answers them)."""
        if not queries:
            raise ClientError("give at least one photo or text to search for")
        params: list[tuple[str, Any]] = [("k", k), *(("prefix", p) for p in prefixes)]
        with ExitStack() as stack:
            files = [
                ("files", (Path(q).name, stack.enter_context(Path(q).expanduser().open("rb")), _content_type(Path(q))))
                for q in queries
                if is_photo(q)
            ]
            texts = [("text", q) for q in queries if not is_photo(q)]
            if not files:
                # Text only: urlencoded is enough (and what the server allows for text-only requests).
                return dict(self._request("POST", "/search", params=params, data=texts))
            return dict(self._request("POST", "/search", params=params, data=texts, files=files))

    def search_combined(
        self, queries: Sequence[WeightedQuery], k: int = 5, prefixes: Sequence[str] = ()
    ) -> dict[str, Any]:
        """One result list for the weighted sum of every query."""
        if not queries:
            raise ClientError("give at least one photo or text to search for")
        params: list[tuple[str, Any]] = [("k", k), *(("prefix", p) for p in prefixes)]
        photos = [q for q in queries if q.is_photo]
        texts = [q for q in queries if not q.is_photo]
        data: list[tuple[str, Any]] = [("text", q.query) for q in texts]
        data += [("text_weight", repr(q.weight)) for q in texts]
        data += [("file_weight", repr(q.weight)) for q in photos]
        with ExitStack() as stack:
            files: list[tuple[str, tuple[str, BinaryIO, str]]] = [
                (
                    "files",
                    (Path(q.query).name, stack.enter_context(Path(q.query).open("rb")), _content_type(Path(q.query))),
                )
                for q in photos
            ]
            # Texts alone go urlencoded; with photos, requests sends the same fields as multipart.
            return dict(self._request("POST", "/search/combined", params=params, data=data, files=files or None))

    def add(self, paths: Sequence[Path], keys: Sequence[str] | None = None, wait: str = "indexed") -> dict[str, Any]:
        """Upload images (optionally under the given keys): the server's answer, one result per file."""
        with ExitStack() as stack:
            files = [
                ("files", (path.name, stack.enter_context(path.open("rb")), _content_type(path))) for path in paths
            ]
            data = [("key", key) for key in keys] if keys else []
            return dict(self._request("POST", "/images", write=True, params={"wait": wait}, data=data, files=files))

    def delete(self, image_id: int, wait: str = "indexed") -> dict[str, Any]:
        return dict(self._request("DELETE", f"/images/{int(image_id)}", write=True, params={"wait": wait}))
