"""C-FIND response identifiers encoded straight from index rows.

Building a pydicom Dataset per match and writing it out cost more than the query itself
once a study-level query had dozens of matches. The requested keys are the same for
every match, so their tags, VRs and order are worked out once per request, and a row
becomes bytes by concatenation: in ASCII, or in UTF-8 where a name needs it and the
character set rule below picks UTF-8. Anything else (another character set, sequences,
DS, a transfer syntax other than Little Endian) takes the pydicom path of
:func:`pacs.dimse.find.encode_match`; the two agree byte for byte, which the tests check.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import pydicom.charset
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs.encoding import LONG_LENGTH_VRS, NUMBER_FORMATS
from pacs.query import ATTRIBUTES, Level

# Set by the responder whatever the request asked for them (PS3.4 C.4.1.1.3.2).
CONTROL_KEYS = frozenset({"SpecificCharacterSet", "QueryRetrieveLevel", "RetrieveAETitle"})
UTF8 = "ISO_IR 192"
# Values written as text, with nothing of pydicom's own formatting in between.
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
# The text VRs that Specific Character Set applies to (PS3.5 6.1.2.3).
_CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_BINARY = {vr: NUMBER_FORMATS[vr] for vr in ("US", "UL", "SS", "SL")}  # integers


def _encodes(value: str, encoding: str) -> bool:
    try:
        value.encode(encoding)
    except (UnicodeError, LookupError):
        return False
    return True


def _encodable(values: list[str], charset: list[str]) -> bool:
    encodings = pydicom.charset.convert_encodings(charset)
    for value in values:
        if value.isascii():
            continue
        if not any(_encodes(value, encoding) for encoding in encodings):
            return False
    return True


def response_charset(requested: list[str], texts: list[str]) -> list[str] | None:
    """Answer in the requester's character set when it can carry the values, else UTF-8."""
    if all(t.isascii() for t in texts):
        return requested or None
    if requested and _encodable(texts, requested):
        return requested
    return [UTF8]


def requested_charset(identifier: Dataset) -> list[str]:
    requested = identifier.get("SpecificCharacterSet")
    if isinstance(requested, MultiValue):
        return [str(c) for c in requested]
    return [str(requested)] if requested else []


class MatchEncoder:
    """Encodes the identifiers of one request's matches; ``encode`` gives None where a
    row needs the general path."""

    def __init__(
        self, identifier: Dataset, level: Level, retrieve_ae_title: str, transfer_syntax: str
    ) -> None:
        self._explicit = transfer_syntax == ExplicitVRLittleEndian
        self._usable = self._explicit or transfer_syntax == ImplicitVRLittleEndian
        keys: list[tuple[int, str, str]] = []
        for element in identifier:
            keyword = element.keyword
            if keyword in CONTROL_KEYS:
                continue
            vr = str(element.VR)
            if keyword not in ATTRIBUTES or (
                vr not in _TEXT_VRS and vr not in _BINARY and vr != "IS"
            ):
                # Values from the stored header, sequences, private attributes: the
                # general path.
                self._usable = False
            keys.append((int(element.tag), vr, keyword))
        self._keys = sorted(keys)
        self._requested = requested_charset(identifier)
        fixed = [
            (0x00080052, self._element(0x00080052, "CS", level.value.encode())),
            (0x00080054, self._element(0x00080054, "AE", retrieve_ae_title.encode())),
        ]
        # What precedes the keys' values: for an all-ASCII row, the requested character
        # set as asked; for a row that needs UTF-8, ISO_IR 192.
        self._ascii_head = fixed + self._charset_element(self._requested)
        self._utf8_head = fixed + self._charset_element([UTF8])

    def encode(self, row: Mapping[str, Any]) -> bytes | None:
        if not self._usable:
            return None
        values: list[str | bytes] = []
        texts: list[str] = []
        for _tag, vr, keyword in self._keys:
            value = row.get(keyword) if keyword in ATTRIBUTES else None
            if value is None or value == "":
                values.append(b"")
            elif vr in _BINARY:
                try:
                    values.append(struct.pack(_BINARY[vr], int(value)))
                except struct.error:
                    return None  # out of range: the general path reports it
            else:
                text = str(int(value)) if vr == "IS" else str(value)
                if not text.isascii() and vr not in _CHARSET_VRS:
                    return None
                values.append(text)
                texts.append(text)
        if all(t.isascii() for t in texts):
            codec, head = "ascii", self._ascii_head
        elif response_charset(self._requested, texts) == [UTF8]:
            codec, head = "utf-8", self._utf8_head
        else:
            return None  # another character set: pydicom knows how to write it
        body = [
            (tag, self._element(tag, vr, v if isinstance(v, bytes) else v.encode(codec)))
            for (tag, vr, _keyword), v in zip(self._keys, values, strict=True)
        ]
        return b"".join(data for _tag, data in sorted(head + body, key=lambda e: e[0]))

    def _charset_element(self, charset: list[str]) -> list[tuple[int, bytes]]:
        if not charset:
            return []
        return [(0x00080005, self._element(0x00080005, "CS", "\\".join(charset).encode()))]

    def _element(self, tag: int, vr: str, raw: bytes) -> bytes:
        if len(raw) % 2:
            raw += b"\0" if vr == "UI" else b" "
        group, number = tag >> 16, tag & 0xFFFF
        if not self._explicit:
            return struct.pack("<HHI", group, number, len(raw)) + raw
        if vr in LONG_LENGTH_VRS:
            return struct.pack("<HH2sHI", group, number, vr.encode(), 0, len(raw)) + raw
        return struct.pack("<HH2sH", group, number, vr.encode(), len(raw)) + raw
