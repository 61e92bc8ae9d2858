"""Frames of stored instances: as stored, decoded, or re-encoded, read from the blob.

WADO-RS frames, rendered images and the inference pipeline need one frame at a time
from instances that may be large multi-frame objects. Only the header is parsed; a
native frame is read at its offset and an encapsulated one is located through the
Basic (or Extended) Offset Table, so one frame costs one frame of I/O.
"""

from __future__ import annotations

import importlib.util
import io
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from pacs.codestream import dimensions
from pacs.encoding import NATIVE_LITTLE_ENDIAN, UNDEFINED_LENGTH
from pacs.errors import NoSuchFrame, UndecodablePixels
from pacs.stored import read_stored

PIXEL_DATA = 0x7FE00010
# CharLS (pyjpegls) decodes JPEG-LS about five times faster than libjpeg (pylibjpeg),
# which pydicom would otherwise try first.
_PREFERRED_PLUGIN = {JPEGLSLossless: "pyjpegls", JPEGLSNearLossless: "pyjpegls"}


@dataclass(frozen=True, slots=True)
class StoredImage:
    """The header of a stored instance and where its Pixel Data value lies in the file."""

    header: Dataset
    transfer_syntax: UID
    frames_value: object  # NumberOfFrames as stored; see number_of_frames
    value_offset: int | None
    value_length: int
    # The VR Pixel Data was written with (explicit VR), or the one PS3.5 A.1 implies.
    stored_vr: str = ""

    @property
    def pixel_vr(self) -> str:
        if self.stored_vr in ("OB", "OW"):
            return self.stored_vr
        if self.encapsulated:
            return "OB"
        return (
            "OW"
            if self.transfer_syntax.is_implicit_VR
            else ("OB" if int(self.header.get("BitsAllocated") or 8) <= 8 else "OW")
        )

    @property
    def number_of_frames(self) -> int:
        """NumberOfFrames (1 when absent). A value that is not a number leaves the
        header readable (metadata is served) but the pixels unusable: which frame is
        where cannot be known."""
        value = self.frames_value
        if value is None or value == "":
            return 1
        try:
            frames = int(str(value).strip())
        except ValueError:
            raise UndecodablePixels(
                f"NumberOfFrames {str(value)[:20]!r} is not a number: the frames cannot be read"
            ) from None
        if frames < 1:
            raise UndecodablePixels(f"NumberOfFrames {frames} is not a frame count")
        return frames

    @property
    def encapsulated(self) -> bool:
        """PS3.5 A.4 wants undefined length; some writers give the items a defined one."""
        return self.value_length == UNDEFINED_LENGTH or self.transfer_syntax.is_encapsulated

    @property
    def has_pixels(self) -> bool:
        return self.value_offset is not None

    @property
    def frame_bits(self) -> int:
        ds = self.header
        samples = int(ds.get("SamplesPerPixel", 1))
        if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
            # Native 4:2:2 keeps two chroma values per two pixels (PS3.3 C.7.6.3.1.2).
            samples = 2
        return int(ds.Rows * ds.Columns * samples * ds.BitsAllocated)

    @property
    def frame_length(self) -> int:
        """Bytes of one native frame (bit-packed frames are rounded up to a whole byte)."""
        return (self.frame_bits + 7) // 8


def read_image(stream: BinaryIO) -> StoredImage:
    """Parse a stored Part 10 file up to its Pixel Data and note where that value is."""
    ds = read_stored(stream)
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    frames = _raw_value(ds, "NumberOfFrames")
    if syntax == DeflatedExplicitVRLittleEndian:
        # Offsets inside a deflated stream mean nothing on disk; decode instead.
        has = "Rows" in ds
        return StoredImage(ds, syntax, frames, 0 if has else None, 0)
    head = stream.read(12)
    if len(head) < 8:
        return StoredImage(ds, syntax, frames, None, 0)
    endian = "<" if syntax.is_little_endian else ">"
    group, element = struct.unpack(f"{endian}HH", head[:4])
    if (group << 16 | element) != PIXEL_DATA:
        return StoredImage(ds, syntax, frames, None, 0)
    start = stream.tell() - len(head)
    if syntax.is_implicit_VR:
        (length,) = struct.unpack(f"{endian}L", head[4:8])
        offset = start + 8
    else:
        (length,) = struct.unpack(f"{endian}L", head[8:12])
        offset = start + 12
        return StoredImage(ds, syntax, frames, offset, length, head[4:6].decode("latin-1"))
    return StoredImage(ds, syntax, frames, offset, length)


def _raw_value(ds: Dataset, keyword: str) -> object:
    try:
        return ds.get(keyword)
    except Exception:  # a value pydicom cannot convert at all
        element = ds.get_item(keyword)
        return None if element is None else element.value


@dataclass
class PixelLimits:
    """Set once by the composition root (``max_pixels``)."""

    max_pixels: int = 1 << 27


LIMITS = PixelLimits()
_ALLOCATED = (1, 8, 16, 32)


def check_pixels(image: StoredImage, stream: BinaryIO) -> None:
    """Refuse, before anything is decoded or a frame list is made, an image whose pixel
    description is not one that can be decoded within the limits, or whose frame count
    its pixel data does not bear out (NumberOfFrames 2^31 on a one-frame image)."""
    if not image.has_pixels:
        raise NoSuchFrame("the instance has no pixel data")
    ds = image.header
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.get("BitsAllocated") or 0)
    if rows < 1 or columns < 1:
        raise UndecodablePixels(f"Rows {rows} x Columns {columns}: there is no image")
    if samples not in (1, 3):
        raise UndecodablePixels(f"SamplesPerPixel {samples} is not 1 or 3 (PS3.3 C.7.6.3)")
    if bits not in _ALLOCATED:
        raise UndecodablePixels(f"BitsAllocated {bits} is not one of 1, 8, 16, 32")
    if rows * columns * samples > LIMITS.max_pixels:
        raise UndecodablePixels(
            f"{rows} x {columns} x {samples} samples per frame is more than max_pixels "
            f"{LIMITS.max_pixels}"
        )
    frames = image.number_of_frames
    if image.transfer_syntax == DeflatedExplicitVRLittleEndian:
        return  # read from an inflated copy (Archive.open_parsed), checked there
    if not image.encapsulated:
        needed = frames * image.frame_length if _byte_aligned(image) else 0
        if image.value_length < needed:
            raise UndecodablePixels(
                f"NumberOfFrames {frames} needs {needed} bytes of pixel data; there are "
                f"{image.value_length}"
            )
        return
    assert image.value_offset is not None
    fragments = _count_fragments(stream, image.value_offset, frames)
    if fragments < frames:
        raise UndecodablePixels(
            f"NumberOfFrames {frames}, but the pixel data holds {fragments} fragment(s)"
        )


def _count_fragments(stream: BinaryIO, offset: int, enough: int) -> int:
    """Fragments after the Basic Offset Table, counting no further than ``enough``."""
    stream.seek(offset)
    count = -1  # the first item is the offset table
    while count < enough:
        head = stream.read(8)
        if len(head) < 8:
            break
        group, element, length = struct.unpack("<HHL", head)
        if (group, element) != (0xFFFE, 0xE000):
            break
        count += 1
        stream.seek(length, io.SEEK_CUR)
    return max(count, 0)


def _check_frame_size(frame: bytes, image: StoredImage) -> None:
    """A compressed frame may claim any size in its own header: not more than the
    instance's Rows and Columns, which the limits were checked on."""
    claimed = dimensions(frame)
    rows, columns = int(image.header.Rows), int(image.header.Columns)
    if claimed is not None and (claimed[0] > rows or claimed[1] > columns):
        raise UndecodablePixels(
            f"the frame's codestream says {claimed[0]} x {claimed[1]}, the instance "
            f"{rows} x {columns}"
        )


def _check_index(image: StoredImage, index: int) -> None:
    if not image.has_pixels:
        raise NoSuchFrame("the instance has no pixel data")
    if not 0 <= index < image.number_of_frames:
        raise NoSuchFrame(
            f"frame {index + 1} does not exist (NumberOfFrames {image.number_of_frames})"
        )


def stored_frame(stream: BinaryIO, image: StoredImage, index: int) -> bytes:
    """Frame ``index`` (from 0) exactly as stored: a compressed bit stream or native bytes."""
    check_pixels(image, stream)
    _check_index(image, index)
    if image.transfer_syntax == DeflatedExplicitVRLittleEndian:
        return _decoded_native(stream, image, index)
    assert image.value_offset is not None
    if image.encapsulated:
        stream.seek(image.value_offset)
        offsets = None
        if "ExtendedOffsetTable" in image.header:
            offsets = (
                image.header.ExtendedOffsetTable,
                image.header.ExtendedOffsetTableLengths,
            )
        try:
            return get_frame(
                stream, index, extended_offsets=offsets, number_of_frames=image.number_of_frames
            )
        except (ValueError, KeyError, struct.error) as exc:
            raise UndecodablePixels(f"frame {index + 1} cannot be located: {exc}") from exc
    if not _byte_aligned(image):
        return _decoded_native(stream, image, index)
    size = image.frame_length
    stream.seek(image.value_offset + index * size)
    data = stream.read(size)
    if len(data) != size:
        raise UndecodablePixels(f"frame {index + 1} is truncated in the stored file")
    return data


def decoded_frame(stream: BinaryIO, image: StoredImage, index: int, *, rgb: bool) -> np.ndarray:
    """Frame ``index`` decoded to an array; ``rgb`` converts YBR colour to RGB."""
    check_pixels(image, stream)
    _check_index(image, index)
    if image.encapsulated:
        _check_frame_size(stored_frame(stream, image, index), image)
    if _plain_grey(image):
        return _native_grey(stream, image, index)
    stream.seek(0)
    plugin = decoding_plugin(image.transfer_syntax)
    try:
        if image.transfer_syntax == DeflatedExplicitVRLittleEndian:
            # pydicom reads frames lazily from plain files only; inflate the whole.
            source: BinaryIO | Dataset = read_stored(stream, pixels=True)
        else:
            source = stream
        return pixel_array(source, index=index, raw=not rgb, decoding_plugin=plugin)
    except Exception as exc:  # every decoder plugin raises its own types
        raise UndecodablePixels(
            f"{image.transfer_syntax.name} pixel data cannot be decoded: {exc}"
        ) from exc


def _plain_grey(image: StoredImage) -> bool:
    """A native little endian single-sample frame of 8 or 16 bit words: the common case
    of projection radiography, read in one go instead of through pydicom's decoder."""
    ds = image.header
    return (
        image.transfer_syntax in NATIVE_LITTLE_ENDIAN
        and not image.encapsulated
        and int(ds.get("SamplesPerPixel", 1)) == 1
        and ds.get("BitsAllocated") in (8, 16)
        and 0 < int(ds.get("BitsStored") or 0) <= int(ds.BitsAllocated)
        and ds.get("PixelRepresentation") in (0, 1)
    )


def _native_grey(stream: BinaryIO, image: StoredImage, index: int) -> np.ndarray:
    """The frame as pydicom decodes it, high bits beyond Bits Stored ignored (PS3.5 8.1.1)."""
    ds = image.header
    bits, stored = int(ds.BitsAllocated), int(ds.BitsStored)
    signed = int(ds.PixelRepresentation) == 1
    frame = np.empty((int(ds.Rows), int(ds.Columns)), dtype=f"<{'i' if signed else 'u'}{bits // 8}")
    assert image.value_offset is not None
    stream.seek(image.value_offset + index * image.frame_length)
    if stream.readinto(frame.reshape(-1).view(np.uint8)) != frame.nbytes:  # type: ignore[attr-defined]
        raise UndecodablePixels(f"frame {index + 1} is truncated in the stored file")
    if stored < bits:
        low, high = (
            (-(1 << (stored - 1)), (1 << (stored - 1)) - 1) if signed else (0, (1 << stored) - 1)
        )
        if frame.min() < low or frame.max() > high:  # only then do the unused bits matter
            np.left_shift(frame, bits - stored, out=frame)
            np.right_shift(frame, bits - stored, out=frame)
    return frame


def decoding_plugin(syntax: UID) -> str:
    """The fastest installed decoder for ``syntax``; "" lets pydicom choose."""
    plugin = _PREFERRED_PLUGIN.get(syntax, "")
    if plugin and importlib.util.find_spec("jpeg_ls") is None:
        return ""
    return plugin


def native_frame(stream: BinaryIO, image: StoredImage, index: int) -> bytes:
    """Frame ``index`` as uncompressed little endian bytes.

    For a native stored frame this is the stored bytes. A compressed one is decoded;
    YBR colour from a JPEG bit stream comes out as RGB, as it does when the whole
    instance is decompressed (the decompressed instance says RGB), so that frames and
    retrieved instances agree.
    """
    syntax = image.transfer_syntax
    if syntax in NATIVE_LITTLE_ENDIAN or syntax == DeflatedExplicitVRLittleEndian:
        return stored_frame(stream, image, index)
    photometric = str(image.header.get("PhotometricInterpretation", "")).strip()
    return _decoded_native(stream, image, index, rgb=photometric.startswith("YBR"))


def _byte_aligned(image: StoredImage) -> bool:
    """Bit-packed (1-bit) frames start on a byte boundary only if their size allows it."""
    return image.frame_bits % 8 == 0 or image.number_of_frames == 1


def _decoded_native(
    stream: BinaryIO, image: StoredImage, index: int, *, rgb: bool = False
) -> bytes:
    array = decoded_frame(stream, image, index, rgb=rgb)
    if image.header.BitsAllocated == 1:
        return np.packbits(array.ravel(), bitorder="little").tobytes()
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def transcode(stream: BinaryIO, syntax: UID) -> bytes:
    """The whole instance re-encoded as uncompressed ``syntax`` (a Part 10 file).

    The SOP Instance UID is kept: a viewer asking for uncompressed pixels wants the same
    instance, not a derived one.
    """
    if syntax not in NATIVE_LITTLE_ENDIAN:
        raise UndecodablePixels(f"cannot encode {syntax} here")
    ds = read_stored(stream, pixels=True)
    if not ds.file_meta.TransferSyntaxUID.is_little_endian:
        return _big_to_little(stream, ds, syntax)
    try:
        if ds.file_meta.TransferSyntaxUID.is_compressed and "PixelData" in ds:
            plugin = decoding_plugin(ds.file_meta.TransferSyntaxUID)
            ds.decompress(generate_instance_uid=False, decoding_plugin=plugin)
    except Exception as exc:
        raise UndecodablePixels(
            f"{ds.file_meta.TransferSyntaxUID.name} pixel data cannot be decoded: {exc}"
        ) from exc
    ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    try:
        ds.save_as(out, enforce_file_format=True)
    except Exception as exc:
        raise UndecodablePixels(f"cannot re-encode the instance as {syntax.name}: {exc}") from exc
    return out.getvalue()


# Bytes per word of the binary VRs whose values are byte-swapped in big endian (PS3.5 7.3).
_SWAPPED_VRS = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _big_to_little(stream: BinaryIO, ds: Dataset, syntax: UID) -> bytes:
    """Big endian (retired, PS3.5 A.3) to little endian: lossless, values kept; pydicom
    leaves the words of binary values and the pixel data for the caller to swap."""
    try:
        for element in ds.iterall():
            words = _SWAPPED_VRS.get(str(element.VR))
            if words and element.tag != PIXEL_DATA and isinstance(element.value, bytes):
                value = element.value
                usable = len(value) - len(value) % words
                swapped = np.frombuffer(value[:usable], dtype=f">u{words}").astype(f"<u{words}")
                element.value = swapped.tobytes() + value[usable:]
        if "PixelData" in ds:
            stream.seek(0)
            array = pixel_array(stream, raw=True)
            if int(ds.get("SamplesPerPixel", 1)) > 1 and int(ds.get("PlanarConfiguration", 0)):
                # pydicom hands colour by pixel; the data set keeps it by plane.
                array = np.moveaxis(array, -1, -3)
            if int(ds.BitsAllocated) == 1:
                data = np.packbits(array.ravel(), bitorder="little").tobytes()
            else:
                data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            ds.PixelData = data + (b"\0" if len(data) % 2 else b"")
            ds["PixelData"].VR = "OB" if int(ds.BitsAllocated) <= 8 else "OW"
        ds.file_meta.TransferSyntaxUID = syntax
        out = io.BytesIO()
        pydicom.dcmwrite(out, ds, enforce_file_format=True)
    except Exception as exc:
        raise UndecodablePixels(f"cannot re-encode the big endian instance: {exc}") from exc
    return out.getvalue()
