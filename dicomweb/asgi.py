"""Error answers sent by plain ASGI middleware, shaped like the app's own error answers."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Send

from pacs.errors import PacsError


async def send_error(
    send: Send, exc: PacsError, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """``{"error": reason}`` with the error's HTTP status, before any other answer began."""
    body = json.dumps({"error": str(exc)}).encode()
    start: dict[str, Any] = {"type": "http.response.start", "status": exc.http_status}
    start["headers"] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *headers,
    ]
    await send(start)
    await send({"type": "http.response.body", "body": body})
