"""DICOM status codes as named constants, grouped per service (PS3.4 Annex B, PS3.7 Annex C).

Handlers return these names, never bare hex literals, so a reader can tell a refusal
for lack of resources from one for a malformed data set.
"""

from __future__ import annotations

from enum import IntEnum


class GeneralStatus(IntEnum):
    """Statuses shared by every DIMSE service (PS3.7 Annex C)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    SOP_CLASS_NOT_SUPPORTED = 0x0122


class StoreStatus(IntEnum):
    """C-STORE statuses (PS3.4 B.2.3) plus the general ones we use for it."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    WARNING_COERCION = 0xB000
    WARNING_ELEMENTS_DISCARDED = 0xB006
    WARNING_DATA_SET_DOES_NOT_MATCH = 0xB007


class QueryStatus(IntEnum):
    """C-FIND, C-MOVE and C-GET statuses (PS3.4 C.4)."""

    SUCCESS = 0x0000
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01
    CANCEL = 0xFE00
    OUT_OF_RESOURCES = 0xA700
    OUT_OF_RESOURCES_SUB_OPERATIONS = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    UNABLE_TO_PROCESS = 0xC000
    SUB_OPERATIONS_COMPLETE_WITH_FAILURES = 0xB000
