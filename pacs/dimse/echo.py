"""C-ECHO SCP (PS3.7 9.1.5): answers Success so peers can verify the association."""

from __future__ import annotations

import logging

from pynetdicom import evt

from pacs.status import GeneralStatus

log = logging.getLogger(__name__)


def echoed(ae_title: str, address: str, port: int) -> int:
    """The answer to a C-ECHO, logged alike on every path."""
    log.info("C-ECHO from %s at %s:%s", ae_title, address, port)
    return int(GeneralStatus.SUCCESS)


def handle_echo(event: evt.Event) -> int:
    requestor = event.assoc.requestor
    return echoed(requestor.ae_title, requestor.address, requestor.port)
