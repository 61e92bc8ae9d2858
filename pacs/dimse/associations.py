"""Association lifecycle in the log (who connected, how it ended) and refusals in the
audit trail."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pynetdicom import evt

from pacs.audit import Actor, AuditEvent, AuditTrail, Outcome

log = logging.getLogger(__name__)


def _peer(event: evt.Event) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.ae_title or '?'}@{requestor.address}:{requestor.port}"


def accepted(peer: str) -> None:
    """Logged for every association, pynetdicom's or ours (pacs.dimse.direct), alike."""
    log.info("association accepted from %s", peer)


def aborted(peer: str, reason: str = "") -> None:
    log.warning("association with %s aborted%s", peer, f": {reason}" if reason else "")


def on_accepted(event: evt.Event) -> None:
    accepted(_peer(event))


def on_rejected(event: evt.Event) -> None:
    log.warning("association rejected from %s", _peer(event))


def on_aborted(event: evt.Event) -> None:
    aborted(_peer(event))


def actor(event: evt.Event) -> Actor:
    requestor = event.assoc.requestor
    return Actor(str(requestor.ae_title or ""), str(requestor.address), "DIMSE")


def handlers(audit: AuditTrail) -> list[tuple[Any, Callable[[evt.Event], None]]]:
    def rejected(event: evt.Event) -> None:
        on_rejected(event)
        audit.record(
            AuditEvent.LOGIN, actor(event), Outcome.MINOR_FAILURE, detail="association rejected"
        )

    return [
        (evt.EVT_ACCEPTED, on_accepted),
        (evt.EVT_REJECTED, rejected),
        (evt.EVT_ABORTED, on_aborted),
    ]
