from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian

from pacs.errors import InvalidInstance
from pacs.part10 import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    PREAMBLE,
    FileMeta,
    encode_file_meta,
    read_file_meta,
)
from pacs.structure import MAX_SEQUENCE_DEPTH, check_structure
from tests.support.instances import ct_instance, part10


def test_meta_round_trip() -> None:
    meta = FileMeta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", ExplicitVRLittleEndian)
    head = encode_file_meta(meta)
    assert head[:128] == PREAMBLE
    stream = io.BytesIO(head + b"rest")
    assert read_file_meta(stream) == meta
    assert stream.read() == b"rest"
    # Deterministic: the same identity always gives the same bytes.
    assert encode_file_meta(meta) == head


def test_meta_is_readable_by_pydicom() -> None:
    ds = ct_instance()
    stream = io.BytesIO(part10(ds))
    meta = read_file_meta(stream)
    head = encode_file_meta(meta)
    body = stream.read()
    parsed = pydicom.dcmread(io.BytesIO(head + body))
    assert parsed.SOPInstanceUID == ds.SOPInstanceUID
    assert parsed.file_meta.ImplementationVersionName == "FILMLESS_010"


def test_meta_without_preamble_or_prefix_is_read() -> None:
    meta = FileMeta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", ExplicitVRLittleEndian)
    group = encode_file_meta(meta)[132:]
    for data in (b"DICM" + group, group):
        stream = io.BytesIO(data + b"rest")
        assert read_file_meta(stream) == meta
        assert stream.read() == b"rest"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "no 'DICM'"),
        (b"\x00" * 132, "no 'DICM'"),
        (PREAMBLE + b"DICM" + b"\x02\x00\x10\x00UI\x40\x00" + b"1.2", "truncated"),
        (PREAMBLE + b"DICM", "MediaStorageSOPClassUID is missing"),
    ],
)
def test_bad_meta_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidInstance, match=reason):
        read_file_meta(io.BytesIO(data))


def _data_set_offset(data: bytes) -> int:
    stream = io.BytesIO(data)
    read_file_meta(stream)
    return stream.tell()


def test_structure_accepts_a_sound_file(tmp_path: Path) -> None:
    data = part10(ct_instance())
    path = tmp_path / "ok.dcm"
    path.write_bytes(data)
    check_structure(path, _data_set_offset(data), explicit=True, little=True)


def test_structure_refuses_truncation(tmp_path: Path) -> None:
    data = part10(ct_instance())
    path = tmp_path / "short.dcm"
    path.write_bytes(data[:-100])
    with pytest.raises(InvalidInstance, match="truncated"):
        check_structure(path, _data_set_offset(data), explicit=True, little=True)


def test_structure_refuses_an_unterminated_sequence(tmp_path: Path) -> None:
    ds = ct_instance()
    del ds.PixelData
    item = Dataset()
    item.CodeValue = "1"
    ds.ProcedureCodeSequence = [item]
    data = part10(ds)
    # Cut the sequence delimiter and item delimiter off an undefined-length sequence.
    ds.ProcedureCodeSequence.is_undefined_length = True
    data = part10(ds)
    path = tmp_path / "seq.dcm"
    path.write_bytes(data[:-16])
    with pytest.raises(InvalidInstance):
        check_structure(path, _data_set_offset(data), explicit=True, little=True)


def test_structure_refuses_deep_nesting(tmp_path: Path) -> None:
    # (0040,A730) ContentSequence, undefined length, nested beyond the limit.
    sq_open = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    item_open = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    body = (sq_open + item_open) * (MAX_SEQUENCE_DEPTH + 2)
    head = encode_file_meta(
        FileMeta("1.2.840.10008.5.1.4.1.1.88.33", "1.2.3", "1.2.840.10008.1.2.1")
    )
    path = tmp_path / "deep.dcm"
    path.write_bytes(head + body)
    with pytest.raises(InvalidInstance, match="nested deeper"):
        check_structure(path, len(head), explicit=True, little=True)


def test_structure_reads_undefined_length_un_as_implicit(tmp_path: Path) -> None:
    """A private sequence sent as UN with undefined length holds implicit VR items."""
    inner = struct.pack("<HHL", 0x0008, 0x0100, 4) + b"ABCD"  # implicit VR element
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner
    item += struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    un = struct.pack("<HH2sHL", 0x0009, 0x1010, b"UN", 0, 0xFFFFFFFF) + item
    un += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    head = encode_file_meta(FileMeta("1.2.840.10008.5.1.4.1.1.7", "1.2.3", ExplicitVRLittleEndian))
    path = tmp_path / "un.dcm"
    path.write_bytes(head + un)
    check_structure(path, len(head), explicit=True, little=True)


@pytest.mark.parametrize(
    "meta",
    [
        FileMeta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even
        FileMeta("1.2.840.10008.5.1.4.1.1.7", "1.2.3.45", "1.2.840.10008.1.2"),  # odd
        FileMeta("1.2.840.10008.5.1.4.1.1.1.2", "2.25." + "9" * 59, "1.2.840.10008.1.2.4.90"),
    ],
)
def test_meta_group_is_what_pydicom_writes(meta: FileMeta) -> None:
    """The hand-packed group 0002 equals pydicom's encoding of the same elements
    (PS3.10 7.1: explicit VR little endian, even lengths, UIDs padded with NUL)."""
    fm = FileMetaDataset()
    fm.FileMetaInformationVersion = b"\x00\x01"
    fm.MediaStorageSOPClassUID = UID(meta.MediaStorageSOPClassUID)
    fm.MediaStorageSOPInstanceUID = UID(meta.MediaStorageSOPInstanceUID)
    fm.TransferSyntaxUID = UID(meta.TransferSyntaxUID)
    fm.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    fm.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_file_meta_info(buffer, fm, enforce_standard=True)
    encoded = encode_file_meta(meta)
    assert encoded == b"\0" * 128 + b"DICM" + buffer.getvalue()
    assert read_file_meta(io.BytesIO(encoded)) == meta
