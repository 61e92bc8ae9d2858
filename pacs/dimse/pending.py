"""C-FIND pending responses written onto the association as one P-DATA-TF PDU each.

pynetdicom answers every pending yield of a handler by building a DIMSE message, logging
it, encoding its command set twice (once to learn the group length) and handing command
and identifier to its DUL thread as two PDUs. For a query with dozens of matches that
path, not the database, was most of the latency. All pending responses to one request
share their command set, so it is encoded once here; each match then costs one data set
encoding and one PDU carrying both PDVs. PS3.8 9.3.5 lets a P-DATA-TF PDU carry several
PDVs, and a receiver assembles a message from consecutive PDVs whatever PDUs bring them.

The final response still goes through pynetdicom: it is queued on the same DUL queue
behind these, so the peer sees them in order.
"""

from __future__ import annotations

import time
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA

from pacs.dimse.wire import response_command
from pacs.status import QueryStatus

_C_FIND_RSP = 0x8020
_COMMAND = 0x01
_LAST = 0x02
_PDV_OVERHEAD = 6  # item length (4), presentation context ID (1), control header (1)
# Responses waiting in the DUL queue before the query waits for the peer to read:
# a slow reader holds back the database cursor instead of filling memory.
_QUEUE_HIGH_WATER = 64


def find_response_command(sop_class_uid: str, message_id: int, status: int) -> bytes:
    """A C-FIND-RSP command set with a data set (PS3.7 9.3.2.2), Implicit VR Little Endian."""
    return response_command(_C_FIND_RSP, sop_class_uid, message_id, status, data_set=True)


def pdus(
    context_id: int, command: bytes, data_set: bytes, max_length: int
) -> list[list[tuple[int, bytes]]]:
    """The PDV lists of the PDUs carrying one message: as few PDUs as the peer's maximum
    length allows (0: no limit), the data set cut into fragments where it must be."""
    if max_length and max_length - _PDV_OVERHEAD < len(command):
        raise ValueError(f"the peer's maximum PDU length {max_length} cannot hold a response")
    room = max_length - _PDV_OVERHEAD if max_length else max(len(data_set), 1)
    items = [(context_id, bytes([_COMMAND | _LAST]) + command)]
    for start in range(0, max(len(data_set), 1), room):
        last = start + room >= len(data_set)
        items.append((context_id, bytes([_LAST if last else 0]) + data_set[start : start + room]))
    grouped: list[list[tuple[int, bytes]]] = []
    used = 0
    for item in items:
        size = _PDV_OVERHEAD - 1 + len(item[1])
        if grouped and (not max_length or used + size <= max_length):
            grouped[-1].append(item)
            used += size
        else:
            grouped.append([item])
            used = size
    return grouped


def encoded_match(
    identifier: Dataset | bytes, implicit: bool, little: bool, deflated: bool
) -> bytes:
    """A match as its pending response carries it: already encoded, or encoded now."""
    if isinstance(identifier, bytes):
        return identifier
    encoded = encode(identifier, implicit, little, deflated)
    if encoded is None:
        raise ValueError("a matching record could not be encoded")
    return encoded


class PendingResponses:
    """Sends the pending responses of one C-FIND request (see the module docstring)."""

    def __init__(self, assoc: Any, context: Any, message_id: int, sop_class_uid: str) -> None:
        self._assoc = assoc
        self._context_id = int(context.context_id)
        syntax = UID(str(context.transfer_syntax))
        self._implicit = syntax.is_implicit_VR
        self._little = syntax.is_little_endian
        self._deflated = syntax.is_deflated
        self._max_length = int(assoc.requestor.maximum_length or 0)
        self._command = find_response_command(sop_class_uid, message_id, QueryStatus.PENDING)

    def send(self, identifier: Dataset | bytes) -> bool:
        """Queue one match (a data set, or one already encoded in the context's transfer
        syntax); False once the association has gone (nothing more to send)."""
        encoded = encoded_match(identifier, self._implicit, self._little, self._deflated)
        dul = self._assoc.dul
        for pdvs in pdus(self._context_id, self._command, encoded, self._max_length):
            primitive = P_DATA()
            # Annotated as tuples, checked at run time as lists.
            items: Any = [[cid, data] for cid, data in pdvs]
            primitive.presentation_data_value_list = items
            dul.send_pdu(primitive)
        while dul.to_provider_queue.qsize() > _QUEUE_HIGH_WATER:
            if not self._assoc.is_established:
                return False
            time.sleep(0.001)
        return bool(self._assoc.is_established)
