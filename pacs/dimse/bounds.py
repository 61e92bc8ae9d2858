"""A bound on the DIMSE messages pynetdicom gathers in memory.

pynetdicom appends every P-DATA fragment of a message to memory until the message is
complete: a C-FIND identifier of 256 MiB, sent in 1 MiB PDUs that each pass the PDU
limit, cost a DIMSE worker 769 MB before any handler ran. C-STORE data sets go to a
spool instead (:mod:`pacs.dimse.spool`); every other message (command sets, C-FIND,
C-MOVE and C-GET identifiers) may gather at most ``max_identifier_bytes``. A peer that
sends more has its association aborted (A-ABORT) at the fragment that crosses the
limit, and the reason is logged: memory stays at the limit plus one PDU.
"""

from __future__ import annotations

import io
import logging
import threading
from typing import Any

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ

log = logging.getLogger(__name__)

COMMAND_LIMIT = 64 << 10  # a command set is a few hundred bytes
_state = {"data_limit": 1 << 20}
_install_lock = threading.Lock()
_original = DIMSEServiceProvider.receive_primitive


def _bounded(self: DIMSEServiceProvider, primitive: Any) -> None:
    message = self.message
    values = [value for _cx, value in primitive.presentation_data_value_list]
    command_in = sum(len(v) for v in values if v and v[0] & 1)  # PS3.8 E.2: bit 0
    data_in = sum(len(v) for v in values) - command_in
    command = 0 if message is None else message.encoded_command_set.getbuffer().nbytes
    data_set: Any = getattr(message, "data_set", None)
    held = 0
    if isinstance(data_set, io.BytesIO) and not isinstance(message, C_STORE_RQ):
        held = data_set.getbuffer().nbytes
    limit = _state["data_limit"]
    if command + command_in > COMMAND_LIMIT:
        reason = f"a command set over {COMMAND_LIMIT} bytes"
    elif not isinstance(message, C_STORE_RQ) and held + data_in > limit:
        reason = f"an identifier over {limit} bytes (max_identifier_bytes)"
    else:
        _original(self, primitive)
        return
    peer = getattr(self.assoc, "requestor", None)
    log.warning(
        "association from %s@%s aborted: %s",
        getattr(peer, "ae_title", "?"),
        getattr(peer, "address", "?"),
        reason,
    )
    self.message = None
    self.dul.event_queue.put("Evt19")  # unrecognised PDU: A-ABORT, the association ends


def install(max_identifier_bytes: int) -> None:
    with _install_lock:
        _state["data_limit"] = max_identifier_bytes
        DIMSEServiceProvider.receive_primitive = _bounded  # type: ignore[method-assign]
