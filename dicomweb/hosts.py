"""Answer only requests addressed to this server by name (DNS rebinding).

A web page the user opens elsewhere can make the browser send requests to a name it
controls that resolves to 127.0.0.1: without a check, such a page reads and deletes
studies through a server that has no tokens because it only listens on loopback. The
Host header of such a request names the attacker's host, so only the names in
``allowed_hosts`` are answered (the loopback names and the bind address by default);
any other gets 421 Misdirected Request before anything is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_HOST = "*"


def host_name(header: str) -> str:
    """The name of a Host header: no port, IPv6 brackets removed, lower case."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class HostCheck:
    def __init__(self, app: ASGIApp, *, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = {host_name(h) for h in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or ANY_HOST in self.allowed:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if host in self.allowed:
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {
                "error": f"this server does not answer for host {host[:100]!r}; add it to "
                "allowed_hosts to reach it by that name"
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 421,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
