"""Every DICOMweb request in the audit trail: a query, a retrieve, a store, a delete, or a
refused login (401/403), with the caller (token name or "anonymous"), the address and the
study the path names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pacs.audit import Actor, AuditEvent, AuditTrail, Outcome

# The search resources of QIDO-RS; any other GET reads instances (WADO-RS).
_SEARCH = re.compile(
    r"^/(studies|series|instances|studies/[^/]+/(series|instances)|"
    r"studies/[^/]+/series/[^/]+/instances|changes)$"
)
_STUDY = re.compile(r"^/studies/([^/]+)")


def classify(method: str, path: str) -> AuditEvent:
    """The audit event of a request to ``path`` (relative to the API's base path)."""
    if method == "DELETE":
        return AuditEvent.DELETE
    if method == "POST":
        return AuditEvent.STORE
    return AuditEvent.QUERY if _SEARCH.match(path) else AuditEvent.RETRIEVE


def scope_actor(scope: Scope) -> Actor:
    """Who sent a request: the token's name (once checked) and the peer's address."""
    state: dict[str, Any] = scope.get("state", {})
    client = scope.get("client") or ("", 0)
    return Actor(str(state.get("token", "anonymous")), str(client[0]), "DICOMweb")


def request_actor(request: Request) -> Actor:
    return scope_actor(request.scope)


class AuditRequests:
    """ASGI middleware, outside the token check so that refusals are recorded too."""

    def __init__(
        self, app: ASGIApp, *, audit: AuditTrail, prefix: str, also: Sequence[str] = ()
    ) -> None:
        """Requests under ``prefix`` are recorded with their path relative to it; those
        to one of ``also`` (the change feed) with their whole path."""
        self.app = app
        self.audit = audit
        self.prefix = prefix
        self.also = tuple(also)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if path.startswith(self.prefix + "/"):
            relative = path.removeprefix(self.prefix)
        elif path in self.also:
            relative = path
        else:
            relative = ""
        if scope["type"] != "http" or not relative:
            await self.app(scope, receive, send)
            return
        status = 500

        async def remember(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        cut: BaseException | None = None
        try:
            await self.app(scope, receive, remember)
        except BaseException as exc:
            cut = exc
            raise
        finally:
            self._record(scope, relative, status, cut)

    def _record(
        self, scope: Scope, path: str, status: int, cut: BaseException | None = None
    ) -> None:
        state: dict[str, Any] = scope.get("state", {})
        actor = scope_actor(scope)
        study = _STUDY.match(path)
        detail = f"{scope['method']} {path[:300]} -> {status}"
        if note := state.get("audit_note"):
            detail += f" ({note})"
        if cut is not None:
            # The status line went out, the body did not: not a success, whatever it said.
            detail += f", answer cut off: {type(cut).__name__}"
            status = 500
        if status in (401, 403):
            self.audit.record(AuditEvent.LOGIN, actor, Outcome.MINOR_FAILURE, detail=detail)
            return
        outcome = (
            Outcome.SUCCESS
            if status < 400
            else Outcome.MINOR_FAILURE
            if status < 500
            else Outcome.SERIOUS_FAILURE
        )
        self.audit.record(
            classify(scope["method"], path),
            actor,
            outcome,
            StudyInstanceUID=study.group(1) if study else "",
            detail=detail,
        )
