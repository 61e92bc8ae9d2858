"""C-ECHO SCP (PS3.7 9.1.5): answers Success so peers can verify the association."""

from __future__ import annotations

import logging

from pynetdicom import evt

from pacs.status import GeneralStatus

log = logging.getLogger(__name__)


def handle_echo(event: evt.Event) -> int:
    requestor = event.assoc.requestor
    log.info("C-ECHO from %s at %s:%s", requestor.ae_title, requestor.address, requestor.port)
    return int(GeneralStatus.SUCCESS)
