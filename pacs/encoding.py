"""How DICOM data sets are encoded (PS3.5): the facts several modules read and write by.

Two sets of uncompressed transfer syntaxes with two meanings: those the archive decodes,
serves and transcodes to without a codec (little endian, implicit or explicit VR), and
every uncompressed one a peer may send (with the retired big endian syntax, which is
stored as it came).
"""

from __future__ import annotations

from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

# Read, served and transcoded to without a codec; Explicit VR first, the one we prefer.
NATIVE_LITTLE_ENDIAN: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Every uncompressed transfer syntax (PS3.5 A.1-A.3).
UNCOMPRESSED: tuple[UID, ...] = (*NATIVE_LITTLE_ENDIAN, ExplicitVRBigEndian)

# Explicit VR elements of these VRs have 2 reserved bytes and a 4-byte length (PS3.5 7.1.2).
LONG_LENGTH_VRS: frozenset[str] = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
LONG_LENGTH_VR_CODES: frozenset[bytes] = frozenset(vr.encode("ascii") for vr in LONG_LENGTH_VRS)

# Binary numbers and how struct reads them, little endian (PS3.5 6.2).
NUMBER_FORMATS: dict[str, str] = {
    "US": "<H",
    "UL": "<I",
    "SS": "<h",
    "SL": "<i",
    "FL": "<f",
    "FD": "<d",
}

# Undefined length, and the tags that frame sequence items (PS3.5 7.1.2, 7.5).
UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = (0xFFFE, 0xE000)
ITEM_DELIMITATION = (0xFFFE, 0xE00D)
SEQUENCE_DELIMITATION = (0xFFFE, 0xE0DD)
