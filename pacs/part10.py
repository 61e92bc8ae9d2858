"""The DICOM File Format (PS3.10) around the data sets the archive keeps.

Every stored file gets a zero preamble and a File Meta Information group written by us:
the preamble of a received file is never kept (a DICOM/executable polyglot must not be
served back), and a deterministic meta group makes the stored bytes a function of the
data set and its transfer syntax alone, so "the same instance again" is a byte compare.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO

from pydicom.filereader import read_dataset

from pacs.encoding import LONG_LENGTH_VR_CODES
from pacs.errors import InvalidInstance
from pacs.uids import require_uid

PREAMBLE = b"\x00" * 128
PREFIX = b"DICM"
IMPLEMENTATION_CLASS_UID = "2.25.147689926215679578712708350289865579041"
IMPLEMENTATION_VERSION_NAME = "FILMLESS_010"
_MAX_META_LENGTH = 64 * 1024


@dataclass(frozen=True, slots=True)
class FileMeta:
    """The identifying part of a File Meta Information group."""

    MediaStorageSOPClassUID: str
    MediaStorageSOPInstanceUID: str
    TransferSyntaxUID: str


def encode_file_meta(meta: FileMeta) -> bytes:
    """Preamble, prefix and group 0002 exactly as the archive writes them.

    Packed by hand (explicit VR little endian, tag order, UIDs padded with NUL and text
    with a space to even length, PS3.10 7.1): it is written for every instance received,
    and is byte for byte what pydicom's ``write_file_meta_info`` makes of the same
    group (a test holds the two together).
    """
    body = b"".join(
        (
            _META_VERSION,
            _short(0x0002, b"UI", _even(meta.MediaStorageSOPClassUID, b"\0")),
            _short(0x0003, b"UI", _even(meta.MediaStorageSOPInstanceUID, b"\0")),
            _short(0x0010, b"UI", _even(meta.TransferSyntaxUID, b"\0")),
            _IMPLEMENTATION,
        )
    )
    length = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<L", len(body))
    return PREAMBLE + PREFIX + length + body


def _even(text: str, pad: bytes) -> bytes:
    value = text.encode("ascii")
    return value + pad if len(value) % 2 else value


def _short(element: int, vr: bytes, value: bytes) -> bytes:
    """An element of group 0002 with a 2-byte length."""
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


_META_VERSION = b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"
_IMPLEMENTATION = _short(0x0012, b"UI", _even(IMPLEMENTATION_CLASS_UID, b"\0")) + _short(
    0x0013, b"SH", _even(IMPLEMENTATION_VERSION_NAME, b" ")
)


def read_file_meta(stream: BinaryIO, *, lenient: bool = False) -> FileMeta:
    """Read preamble, prefix and group 0002, leaving ``stream`` at the data set's first byte.

    ``lenient``: a UID missing from the group is returned empty instead of refused; the
    archive then takes it from the data set (and the transfer syntax from its encoding),
    as dcmtk and pydicom do when they read such a file.

    A Part 10 file has a "DICM" prefix at offset 128 and a meta group naming the SOP
    Class, SOP Instance and transfer syntax. Like dcmtk and pydicom, a file whose
    preamble (or preamble and prefix) was left out is read too: some writers, pydicom's
    among them, produce such files; the stored copy gets a proper preamble either way.
    """
    start = stream.tell()
    head = stream.read(132)
    if head[:4] == PREFIX:
        stream.seek(start + 4)
    elif head[:2] == b"\x02\x00" and head[4:6].isalpha():
        stream.seek(start)
    elif len(head) < 132 or head[128:132] != PREFIX:
        raise InvalidInstance("not a DICOM Part 10 file: no 'DICM' prefix at offset 128")
    raw = bytearray()
    while True:
        start = stream.tell()
        tag_vr = stream.read(6)
        if len(tag_vr) < 6 or struct.unpack("<H", tag_vr[:2])[0] != 0x0002:
            stream.seek(start)
            break
        vr = tag_vr[4:6]
        if vr in LONG_LENGTH_VR_CODES:
            rest = stream.read(6)
            if len(rest) < 6:
                raise InvalidInstance("File Meta Information is truncated")
            length = struct.unpack("<L", rest[2:])[0]
        else:
            rest = stream.read(2)
            if len(rest) < 2:
                raise InvalidInstance("File Meta Information is truncated")
            length = struct.unpack("<H", rest)[0]
        if len(raw) + length > _MAX_META_LENGTH:
            raise InvalidInstance("File Meta Information is implausibly long")
        value = stream.read(length)
        if len(value) < length:
            raise InvalidInstance("File Meta Information is truncated")
        raw += tag_vr + rest + value
    try:
        ds = read_dataset(BytesIO(bytes(raw)), is_implicit_VR=False, is_little_endian=True)
        sop_class = ds.get("MediaStorageSOPClassUID")
        sop_instance = ds.get("MediaStorageSOPInstanceUID")
        transfer_syntax = ds.get("TransferSyntaxUID")
    except Exception as exc:  # pydicom raises many types for malformed input
        raise InvalidInstance(f"File Meta Information cannot be parsed: {exc}") from exc
    found = {
        "MediaStorageSOPClassUID": _text(sop_class),
        "MediaStorageSOPInstanceUID": _text(sop_instance),
        "TransferSyntaxUID": _text(transfer_syntax),
    }
    return FileMeta(
        **{
            keyword: "" if lenient and not value else require_uid(value, keyword)
            for keyword, value in found.items()
        }
    )


def guess_transfer_syntax(stream: BinaryIO) -> str:
    """The little endian encoding of a data set whose file meta names none (PS3.10 7.1
    makes it Type 1, but writers omit it): explicit when the first element has a VR."""
    start = stream.tell()
    first = stream.read(8)
    stream.seek(start)
    if len(first) < 8:
        raise InvalidInstance("the data set is empty")
    group = struct.unpack("<H", first[:2])[0]
    if group > 0x00FF and struct.unpack(">H", first[:2])[0] <= 0x00FF:
        raise InvalidInstance(
            "the file meta names no transfer syntax and the data set is big endian"
        )
    vr = first[4:6]
    explicit = vr.isalpha() and vr.isupper()
    return "1.2.840.10008.1.2.1" if explicit else "1.2.840.10008.1.2"


def _text(value: object) -> str | None:
    return None if value is None else str(value).strip("\x00 ")
