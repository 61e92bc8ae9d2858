"""Hostile inputs for the limit tests and ``benchmarks.hostile``: built here, sent only
to servers the tests start on loopback.

Each is small on the wire and would cost a server far more than its size: a deflated
data set that inflates a thousandfold, a compressed frame whose codestream claims
16384 x 16384 pixels, an A-ASSOCIATE-RQ with what pynetdicom does not expect.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import openjpeg
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    generate_uid,
)

from pacs.part10 import FileMeta, encode_file_meta

MiB = 1 << 20


def small_image(**changes: object) -> Dataset:
    """A 16 x 16 CT image, with ``changes`` to its attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "HOSTILE"
    ds.PatientName = "Hostile^Input"
    ds.Modality = "CT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.zeros((16, 16), np.uint16).tobytes()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def part10(ds: Dataset) -> bytes:
    syntax = ds.file_meta.TransferSyntaxUID
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, syntax.is_implicit_VR
    write_dataset(body, ds)
    meta = FileMeta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(syntax))
    return encode_file_meta(meta) + body.getvalue()


def deflated_bomb(inflated_bytes: int) -> bytes:
    """A small image whose deflated data set inflates to ``inflated_bytes``: a private
    OB element of zeros (about a megabyte of deflate stream per gigabyte inflated)."""
    ds = small_image()
    block = ds.private_block(0x0009, "FILMLESS BOMB", create=True)
    block.add_new(0x01, "OB", b"")  # placeholder: the zeros are streamed below
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    encoded = body.getvalue()
    marker = struct.pack("<HH2sHL", 0x0009, 0x1001, b"OB", 0, 0)
    at = encoded.index(marker)
    zeros = inflated_bytes - len(encoded)
    head = encoded[:at] + struct.pack("<HH2sHL", 0x0009, 0x1001, b"OB", 0, zeros)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = deflater.compress(head)
    chunk = bytes(MiB)
    for _ in range(zeros // MiB):
        stream += deflater.compress(chunk)
    stream += deflater.compress(bytes(zeros % MiB)) + deflater.compress(encoded[at + len(marker) :])
    stream += deflater.flush()
    meta = FileMeta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), DeflatedExplicitVRLittleEndian)
    return encode_file_meta(meta) + stream


def image_bomb(codec: str, *, header_rows: int) -> bytes:
    """A 64 x 64 compressed frame whose codestream claims 16384 x 16384 pixels, in an
    instance whose header says ``header_rows`` square. ``codec``: jpeg or j2k."""
    pixels = np.full((64, 64), 128, dtype=np.uint8)
    if codec == "jpeg":
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG")
        frame = bytearray(out.getvalue())
        sof = frame.index(b"\xff\xc0")
        struct.pack_into(">HH", frame, sof + 5, 16384, 16384)
        syntax = JPEGBaseline8Bit
    else:
        frame = bytearray(openjpeg.encode(pixels))  # type: ignore[attr-defined]
        siz = frame.index(b"\xff\x51")
        struct.pack_into(">LL", frame, siz + 6, 16384, 16384)
        syntax = JPEG2000Lossless
    ds = small_image(BitsAllocated=8, BitsStored=8, HighBit=7)
    ds.Rows = ds.Columns = header_rows
    ds.PixelData = encapsulate([bytes(frame)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    return part10(ds)


def associate_rq(
    *,
    called: str = "FILMLESS",
    context_id: int = 1,
    identity: bytes | None = None,
) -> bytes:
    """An A-ASSOCIATE-RQ built byte by byte (PS3.8 9.3.2), to get it wrong on purpose."""

    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    application = item(0x10, b"1.2.840.10008.3.1.1.1")
    context = item(
        0x20,
        bytes((context_id, 0, 0, 0))
        + item(0x30, b"1.2.840.10008.1.1")
        + item(0x40, b"1.2.840.10008.1.2"),
    )
    user = item(0x51, struct.pack(">L", 16384)) + item(0x52, b"1.2.3.4")
    if identity is not None:
        user += item(0x58, identity)
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16).encode()
        + b"MODALITY".ljust(16)
        + bytes(32)
        + application
        + context
        + item(0x50, user)
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body
