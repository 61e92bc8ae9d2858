"""The DIMSE messages and PDUs our own associations read and write (PS3.7 E, PS3.8 9.3).

Pure functions over bytes, apart from any socket: command sets are group 0000 in
Implicit VR Little Endian (PS3.7 6.3.1), elements in tag order behind their group
length, as pynetdicom writes them (``tests/test_direct.py`` compares the two).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

# PS3.8 9.3: PDU types.
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
PDU_HEADER = struct.Struct(">BBL")
PDV_HEADER = struct.Struct(">LBB")
_ELEMENT = struct.Struct("<HHL")
_US = struct.Struct("<H")
RELEASE_RP = bytes((0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0))
RELEASE_RQ = bytes((0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0))
# A-ABORT from the service provider (source 2), PS3.8 9.3.8: reason 0 (not specified)
# or 2 (unexpected PDU).
ABORT_NOT_SPECIFIED = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 2, 0))
ABORT_UNEXPECTED_PDU = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 2, 2))

# PS3.7 E.1 command fields and tags.
C_STORE_RQ = 0x0001
C_FIND_RQ = 0x0020
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF
RESPONSE = 0x8000
_NO_DATA_SET = 0x0101
COMMAND_LAST = 0x03  # PS3.8 E.2: message control header of a whole command set
_AFFECTED_SOP_CLASS = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_BEING_RESPONDED_TO = 0x0120
_PRIORITY = 0x0700
_DATA_SET_TYPE = 0x0800
_STATUS = 0x0900
_ERROR_COMMENT = 0x0902
_AFFECTED_SOP_INSTANCE = 0x1000


class ProtocolError(Exception):
    """The peer broke PS3.7/PS3.8: the association is aborted."""


@dataclass(frozen=True, slots=True)
class Command:
    """The parts of a request's command set (PS3.7 9.3, 9.1.5) this path acts on."""

    CommandField: int
    MessageID: int
    AffectedSOPClassUID: str
    AffectedSOPInstanceUID: str
    MessageIDBeingRespondedTo: int
    has_data_set: bool
    # Of a response.
    Status: int = 0
    ErrorComment: str = ""


def parse_command(data: bytes | bytearray | memoryview) -> Command:
    """A command set as PS3.7 6.3.1 encodes it: group 0000, Implicit VR Little Endian."""
    values: dict[int, bytes] = {}
    view = memoryview(data)
    position = 0
    while position + 8 <= len(view):
        group, element, length = _ELEMENT.unpack_from(view, position)
        position += 8
        if group != 0 or position + length > len(view):
            raise ProtocolError("a command set element is not in group 0000 or overruns it")
        values[element] = bytes(view[position : position + length])
        position += length
    if position != len(view):
        raise ProtocolError("a command set ends inside an element header")

    def number(tag: int, default: int = 0) -> int:
        raw = values.get(tag)
        if raw is None:
            return default
        if len(raw) != 2:
            raise ProtocolError(f"command element (0000,{tag:04X}) is not a US")
        return int(_US.unpack(raw)[0])

    def uid(tag: int) -> str:
        return values.get(tag, b"").rstrip(b"\0 ").decode("ascii", "replace")

    if _COMMAND_FIELD not in values:
        raise ProtocolError("a command set without a Command Field")
    return Command(
        CommandField=number(_COMMAND_FIELD),
        MessageID=number(_MESSAGE_ID),
        AffectedSOPClassUID=uid(_AFFECTED_SOP_CLASS),
        AffectedSOPInstanceUID=uid(_AFFECTED_SOP_INSTANCE),
        MessageIDBeingRespondedTo=number(_BEING_RESPONDED_TO),
        has_data_set=number(_DATA_SET_TYPE, _NO_DATA_SET) != _NO_DATA_SET,
        Status=number(_STATUS),
        ErrorComment=values.get(_ERROR_COMMENT, b"").rstrip(b"\0 ").decode("ascii", "replace"),
    )


def _element(tag: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0, tag, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def response_command(
    command_field: int,
    sop_class_uid: str,
    message_id: int,
    status: int,
    *,
    error_comment: str = "",
    sop_instance_uid: str = "",
    data_set: bool = False,
) -> bytes:
    """A response's command set with its group length, elements in tag order."""
    body = b"".join(
        (
            _element(_AFFECTED_SOP_CLASS, _uid(sop_class_uid)) if sop_class_uid else b"",
            _element(_COMMAND_FIELD, _US.pack(command_field)),
            _element(_BEING_RESPONDED_TO, _US.pack(message_id)),
            _element(_DATA_SET_TYPE, _US.pack(0x0001 if data_set else _NO_DATA_SET)),
            _element(_STATUS, _US.pack(status)),
            _element(_ERROR_COMMENT, _text(error_comment)) if error_comment else b"",
            _element(_AFFECTED_SOP_INSTANCE, _uid(sop_instance_uid)) if sop_instance_uid else b"",
        )
    )
    return _element(0x0000, struct.pack("<L", len(body))) + body


def store_request(sop_class_uid: str, sop_instance_uid: str, message_id: int) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1), medium priority, a data set follows."""
    body = b"".join(
        (
            _element(_AFFECTED_SOP_CLASS, _uid(sop_class_uid)),
            _element(_COMMAND_FIELD, _US.pack(C_STORE_RQ)),
            _element(_MESSAGE_ID, _US.pack(message_id)),
            _element(_PRIORITY, _US.pack(0)),
            _element(_DATA_SET_TYPE, _US.pack(0x0001)),
            _element(_AFFECTED_SOP_INSTANCE, _uid(sop_instance_uid)),
        )
    )
    return _element(0x0000, struct.pack("<L", len(body))) + body


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def status_of(answer: Any) -> tuple[int, str]:
    if isinstance(answer, Dataset):
        return int(answer.Status), str(answer.get("ErrorComment", "") or "")
    return int(answer), ""


def p_data_tf(pdvs: list[tuple[int, bytes]]) -> bytes:
    """One P-DATA-TF PDU (PS3.8 9.3.5); each PDV's data starts with its control header."""
    items = b"".join(PDV_HEADER.pack(len(data) + 1, cid, data[0]) + data[1:] for cid, data in pdvs)
    return PDU_HEADER.pack(P_DATA_TF, 0, len(items)) + items
