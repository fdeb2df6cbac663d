"""Reading a whole (small) request body with a byte limit: stop at the first byte over it."""

from __future__ import annotations

from collections.abc import AsyncIterator

from image_search.errors import RequestTooLarge
from serve_app.client_values import parse_decimal


async def read_body(
    content_length: str | None, body: AsyncIterator[bytes], limit: int, too_large_message: str | None = None
) -> bytes:
    """The body, or RequestTooLarge (with `too_large_message` when given) as soon as the declared
    length or the bytes read pass `limit`."""
    too_large = RequestTooLarge(too_large_message or f"This request's body may carry at most {limit} bytes.")
    declared = parse_decimal(content_length) if content_length is not None else None
    if declared is not None and declared > limit:
        raise too_large
    data = bytearray()
    async for chunk in body:
        data += chunk
        if len(data) > limit:
            raise too_large
    return bytes(data)
