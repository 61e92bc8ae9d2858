"""The image size a compressed frame claims, read from its codestream header.

A 2.5 KB JPEG or a 1.7 KB JPEG 2000 can declare 16384 x 16384 pixels; decoders size
their output from that, whatever Rows and Columns of the DICOM header say, and a request
for such a frame cost over a gigabyte. The frame's own header is read first (a few dozen
bytes) and a frame larger than its instance says is refused before any decoder runs.
"""

from __future__ import annotations

import struct

# JPEG start-of-frame markers (ITU T.81 B.1.1.3): baseline, extended, progressive,
# lossless (and their arithmetic variants); 0xF7 is JPEG-LS SOF55 (ITU T.87).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
_J2K_SOC = b"\xff\x4f"
_J2K_SIZ = 0xFF51
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "


def dimensions(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) the frame's codestream declares; None when it is not one this
    knows (RLE, native data) or its header cannot be found."""
    if frame[:2] == b"\xff\xd8":
        return _jpeg(frame)
    if frame[:2] == _J2K_SOC:
        return _j2k(frame, 0)
    if frame[:12] == _JP2_SIGNATURE:
        at = frame.find(b"jp2c")
        return None if at < 0 else _j2k(frame, at + 4)
    return None


def _jpeg(frame: bytes) -> tuple[int, int] | None:
    position = 2
    while position + 4 <= len(frame):
        if frame[position] != 0xFF:
            return None
        marker = frame[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            position += 2
            continue
        (length,) = struct.unpack_from(">H", frame, position + 2)
        if marker in _SOF:
            if position + 9 > len(frame):
                return None
            rows, columns = struct.unpack_from(">HH", frame, position + 5)
            return rows, columns
        if marker == 0xDA:  # start of scan before any frame header
            return None
        position += 2 + length
    return None


def _j2k(frame: bytes, start: int) -> tuple[int, int] | None:
    """SIZ (ITU T.800 A.5.1): Xsiz, Ysiz, XOsiz, YOsiz after Lsiz and Rsiz."""
    if frame[start : start + 2] != _J2K_SOC or start + 24 > len(frame):
        return None
    marker, _length, _caps, width, height, x_origin, y_origin = struct.unpack_from(
        ">HHHLLLL", frame, start + 2
    )
    if marker != _J2K_SIZ:
        return None
    return height - y_origin, width - x_origin
