"""The Ingress's side of the write routes: form, checks, the call to the Writer, the answer.

POST /images answers 201 (wait=indexed, the default: this Ingress already serves a version holding
the change, so the writer's next search finds it) or 202 (wait=stored: the change is durable and
committed in `index_version`, which this Ingress may not serve yet). 202 is sent after the commit
too: a commit here is a small segment, so "durable" and "committed" are the same moment, and there
is no separate write-ahead log to replay. Per-file problems are that file's `error` entry, as in
/search; when no file is usable the first problem is the answer's status.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from image_search.errors import ClientError, ImageNotFound, NoFiles, ServiceError
from serve_app.config import UploadLimits, WritesOptions
from serve_app.downstream import downstream
from serve_app.http_errors import original_error, service_error_response
from serve_app.metrics import IngressMetrics
from serve_app.multipart import Upload, read_form
from serve_app.served_index import ServedIndex
from serve_app.writes.auth import READ_TOKEN_ENV, WRITE_TOKEN_ENV, Tokens, load_token
from serve_app.writes.errors import InvalidKey, InvalidWait, WritesDisabled
from serve_app.writes.keys import MAX_KEY_CHARS, check_key, default_key
from serve_app.writes.plan import Put, Remove

KEY_FIELD = "key"
WAITS = ("indexed", "stored")


def load_tokens(options: WritesOptions) -> Tokens:
    return Tokens(
        write=load_token(options.token_file, WRITE_TOKEN_ENV),
        read=load_token(options.read_token_file, READ_TOKEN_ENV),
    )


def parse_wait(value: str | None) -> str:
    if value is None:
        return "indexed"
    if value not in WAITS:
        raise InvalidWait(f"wait must be one of {', '.join(WAITS)} (default indexed).")
    return value


async def read_upload_form(request: Request, limits: UploadLimits) -> tuple[list[Upload], list[str | None]]:
    """The `files` and their parallel `key` fields (a key per file, in order; fewer keys: the rest default)."""
    uploads, fields = await read_form(
        request.headers.get("content-type"),
        request.headers.get("content-length"),
        request.stream(),
        limits,
        {KEY_FIELD: MAX_KEY_CHARS * 4},
    )
    if not uploads:
        raise NoFiles("Send at least one image in a multipart field named 'files'.")
    keys: list[str | None] = []
    for form_field in fields:
        if form_field.too_large:
            raise InvalidKey(f"A key is at most {MAX_KEY_CHARS} characters.")
        try:
            keys.append(form_field.value.decode("utf-8") or None)
        except UnicodeDecodeError:
            raise InvalidKey("A key must be UTF-8 text.") from None
    if len(keys) > len(uploads):
        raise InvalidKey(f"{len(keys)} keys for {len(uploads)} files: send at most one key per file, in order.")
    return uploads, keys + [None] * (len(uploads) - len(keys))


class ImageWrites:
    def __init__(
        self,
        writer: DeploymentHandle | None,
        tokens: Tokens,
        index: ServedIndex,
        limits: UploadLimits,
        metrics: IngressMetrics,
    ) -> None:
        self.writer = writer
        self.tokens = tokens
        self.index = index
        self.limits = limits
        self.metrics = metrics

    @property
    def enabled(self) -> bool:
        return self.writer is not None and self.tokens.writes_enabled

    def check(self, request: Request) -> None:
        if self.writer is None and self.tokens.writes_enabled:
            raise WritesDisabled("Writes are off: this deployment runs no Writer (redeploy with the token set).")
        try:
            self.tokens.check_write(request.headers.get("authorization"))
        except ServiceError as exc:
            self.metrics.count_write(exc.code)
            raise

    def put_for(self, upload: Upload, item: np.ndarray | ClientError, key: str | None) -> Put | ClientError:
        """A usable upload's Put (vector filled in later), or its problem."""
        if isinstance(item, ClientError):
            return item
        data = bytes(upload.data)
        sha = hashlib.sha256(data).hexdigest()
        try:
            return Put(check_key(key) if key is not None else default_key(sha, data, upload.filename), data, sha)
        except InvalidKey as exc:
            exc.filename = upload.filename
            return exc

    async def add(
        self,
        uploads: list[Upload],
        puts: list[Put | ClientError],
        prepared: list[np.ndarray | ClientError],
        embed: Callable[[list[np.ndarray]], Awaitable[np.ndarray]],
        wait: str,
    ) -> Response:
        # Only the crops of usable files are embedded (a decodable file with a bad key is not), so the
        # vectors line up with the Puts.
        usable = [item for item, put in zip(prepared, puts, strict=True) if isinstance(put, Put)]
        assert all(isinstance(item, np.ndarray) for item in usable)
        vectors = iter(await embed(usable) if usable else [])  # type: ignore[arg-type]
        ops: list[Put | Remove] = []
        for put in puts:
            if isinstance(put, Put):
                ops.append(Put(put.key, put.data, put.sha256, next(vectors)))
        entries: list[dict[str, Any]] = []
        if not ops:
            first = next(put for put in puts if isinstance(put, ClientError))
            for upload, put in zip(uploads, puts, strict=True):
                assert isinstance(put, ClientError)
                self.metrics.count_write(put.code)
                entries.append({"filename": upload.filename, "error": put.to_dict()})
            return service_error_response(first, {"results": entries})
        outcomes, version = await self._submit(ops)
        done = iter(outcomes)
        for upload, put in zip(uploads, puts, strict=True):
            if isinstance(put, ClientError):
                self.metrics.count_write(put.code)
                entries.append({"filename": upload.filename, "error": put.to_dict()})
                continue
            outcome = next(done)
            self.metrics.count_write(outcome.status)
            entry = {"filename": upload.filename, "key": outcome.key, "id": outcome.id, "status": outcome.status}
            entries.append(entry)
        status = await self._waited(version, wait)
        return JSONResponse({"index_version": version, "results": entries}, status_code=status)

    async def delete(self, image_id: int, wait: str) -> Response:
        (outcome,), version = await self._submit([Remove(image_id)])
        if outcome.status == "not_found":
            self.metrics.count_write("not_found")
            raise ImageNotFound(f"There is no indexed image with id {image_id} (never indexed, or removed).")
        self.metrics.count_write("deleted")
        status = await self._waited(version, wait)
        body = {"index_version": version, "id": image_id, "key": outcome.key, "status": "deleted"}
        return JSONResponse(body, status_code=200 if status == 201 else status)

    async def _submit(self, ops: list[Put | Remove]) -> tuple[list[Any], str]:
        assert self.writer is not None
        try:
            outcomes, version = await downstream(self.writer.submit.remote(ops))
        except ServiceError as exc:
            error = original_error(exc)  # the Writer's error arrives wrapped
            self.metrics.count_write(error.code if isinstance(error, ServiceError) else exc.code)
            raise
        return list(outcomes), str(version)

    async def _waited(self, version: str, wait: str) -> int:
        if wait == "stored":
            return 202
        await self.index.serve_at_least(version)
        return 201
