"""The write token (and the optional read token): where it comes from and how a request is checked.

A token is read from a file named in the application's settings (`writes.token_file`), or else from
an environment variable; never from the YAML itself, never logged, never echoed. No token: the routes
it guards are off (writes: 403 writes_disabled). A request carries `Authorization: Bearer <token>`,
compared with `hmac.compare_digest` so the time taken does not tell how much of a guess was right.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.writes.errors import Unauthorized, WritesDisabled

WRITE_TOKEN_ENV = "IMAGE_SEARCH_WRITE_TOKEN"
READ_TOKEN_ENV = "IMAGE_SEARCH_READ_TOKEN"
MIN_TOKEN_CHARS = 16


class TokenConfigError(ValueError):
    """A configured token file cannot be read or holds no usable token (the deploy fails with this)."""


def load_token(token_file: str | None, env_var: str) -> str | None:
    """The token from `token_file` (surrounding whitespace dropped), else from `env_var`; None if neither."""
    if token_file is not None:
        try:
            token = Path(token_file).expanduser().read_text().strip()
        except OSError as exc:
            raise TokenConfigError(f"cannot read the token file {token_file}: {exc.strerror or exc}") from None
        source = f"the token file {token_file}"
    else:
        token = os.environ.get(env_var, "").strip()
        if not token:
            return None
        source = f"${env_var}"
    if len(token) < MIN_TOKEN_CHARS or any(ch.isspace() for ch in token):
        raise TokenConfigError(
            f"{source} must hold one token of at least {MIN_TOKEN_CHARS} characters without spaces "
            "(make one with `openssl rand -hex 32`)"
        )
    return token


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def token_matches(expected: str, given: str | None) -> bool:
    """Constant time in the token's content (a wrong length is not special-cased either)."""
    return hmac.compare_digest(expected.encode(), (given or "").encode())


@dataclass(frozen=True)
class Tokens:
    write: str | None = field(default=None, repr=False)
    read: str | None = field(default=None, repr=False)

    @property
    def writes_enabled(self) -> bool:
        return self.write is not None

    @property
    def reads_need_token(self) -> bool:
        return self.read is not None

    def check_write(self, authorization: str | None) -> None:
        if self.write is None:
            raise WritesDisabled(
                "Writes are off on this service: no write token is configured "
                f"(writes.token_file in serve_config.yaml, or ${WRITE_TOKEN_ENV})."
            )
        if not token_matches(self.write, bearer_token(authorization)):
            raise Unauthorized("Writes need the header 'Authorization: Bearer <write token>'.")

    def check_read(self, authorization: str | None) -> None:
        """Reads are open unless a read token is configured; the write token also reads."""
        if self.read is None:
            return
        given = bearer_token(authorization)
        if token_matches(self.read, given) or (self.write is not None and token_matches(self.write, given)):
            return
        raise Unauthorized("This service needs the header 'Authorization: Bearer <read token>'.")


class ReadTokenMiddleware:
    """With a read token configured, every route but the health check and the write routes (which check
    the write token themselves) needs `Authorization: Bearer <read or write token>`; else 401."""

    def __init__(self, app: ASGIApp, tokens: Tokens) -> None:
        self.app = app
        self.tokens = tokens

    def _exempt(self, scope: Scope) -> bool:
        path, method = str(scope.get("path", "")), str(scope.get("method", ""))
        return path.endswith("/healthz") or method == "DELETE" or (method == "POST" and path.endswith("/images"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.tokens.reads_need_token and not self._exempt(scope):
            headers = {name.lower(): value for name, value in scope.get("headers", [])}
            authorization = headers.get(b"authorization", b"").decode("latin-1")
            try:
                self.tokens.check_read(authorization)
            except Unauthorized as exc:
                from serve_app.http_errors import service_error_response

                await service_error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)
