"""Association lifecycle in the log: who connected, what was refused, how it ended."""

from __future__ import annotations

import logging

from pynetdicom import evt

log = logging.getLogger(__name__)


def _peer(event: evt.Event) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.ae_title or '?'}@{requestor.address}:{requestor.port}"


def on_accepted(event: evt.Event) -> None:
    log.info("association accepted from %s", _peer(event))


def on_rejected(event: evt.Event) -> None:
    log.warning("association rejected from %s", _peer(event))


def on_aborted(event: evt.Event) -> None:
    log.warning("association with %s aborted", _peer(event))


HANDLERS = [
    (evt.EVT_ACCEPTED, on_accepted),
    (evt.EVT_REJECTED, on_rejected),
    (evt.EVT_ABORTED, on_aborted),
]
