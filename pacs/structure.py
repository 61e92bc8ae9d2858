"""A length-checked walk over an encoded data set, before anything trusts its lengths.

pydicom is lenient by design: a value that runs past the end of the file or a sequence
without its delimiter is read short, or dropped with a warning. An archive must refuse
such an instance instead of acknowledging a truncated copy, so every element length and
every undefined-length sequence is checked here against the real end of the bytes.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from pacs.encoding import LONG_LENGTH_VR_CODES
from pacs.errors import InvalidInstance

_UNDEFINED = 0xFFFFFFFF
_ITEM = (0xFFFE, 0xE000)
_ITEM_DELIMITATION = (0xFFFE, 0xE00D)
_SEQUENCE_DELIMITATION = (0xFFFE, 0xE0DD)
MAX_SEQUENCE_DEPTH = 32


class _Walker:
    def __init__(self, buf: mmap.mmap | bytes, little: bool) -> None:
        self.buf = buf
        self.order = "<" if little else ">"

    def _tag(self, pos: int, limit: int) -> tuple[int, int]:
        if pos + 8 > limit:
            raise InvalidInstance(f"data set is truncated at byte {pos}")
        group, element = struct.unpack_from(self.order + "HH", self.buf, pos)
        return group, element

    def elements(self, pos: int, limit: int, depth: int, in_item: bool, explicit: bool) -> int:
        """Skip elements up to ``limit`` (or an item delimiter); return the end position."""
        while pos < limit:
            tag = self._tag(pos, limit)
            if tag == _ITEM_DELIMITATION:
                if in_item:
                    return pos + 8
                raise InvalidInstance(f"unexpected item delimiter at byte {pos}")
            if tag[0] == 0xFFFE:
                raise InvalidInstance(f"unexpected item tag ({tag[0]:04X},{tag[1]:04X})")
            vr = b""
            if explicit:
                vr = bytes(self.buf[pos + 4 : pos + 6])
                if vr in LONG_LENGTH_VR_CODES:
                    if pos + 12 > limit:
                        raise InvalidInstance(f"data set is truncated at byte {pos}")
                    (length,) = struct.unpack_from(self.order + "L", self.buf, pos + 8)
                    pos += 12
                else:
                    (length,) = struct.unpack_from(self.order + "H", self.buf, pos + 6)
                    pos += 8
            else:
                (length,) = struct.unpack_from(self.order + "L", self.buf, pos + 4)
                pos += 8
            if length == _UNDEFINED:
                # An undefined-length UN holds implicit VR items (PS3.5 6.2.2).
                pos = self.items(pos, limit, depth + 1, explicit and vr != b"UN")
            elif pos + length > limit:
                raise InvalidInstance(
                    f"element ({tag[0]:04X},{tag[1]:04X}) claims {length} bytes but only "
                    f"{limit - pos} remain: the data set is truncated"
                )
            else:
                pos += length
        if in_item:
            raise InvalidInstance("a sequence item is missing its delimiter: truncated")
        return pos

    def items(self, pos: int, limit: int, depth: int, explicit: bool) -> int:
        """Skip the items of an undefined-length sequence or encapsulated pixel data."""
        if depth > MAX_SEQUENCE_DEPTH:
            raise InvalidInstance(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels")
        while True:
            tag = self._tag(pos, limit)
            (length,) = struct.unpack_from(self.order + "L", self.buf, pos + 4)
            pos += 8
            if tag == _SEQUENCE_DELIMITATION:
                return pos
            if tag != _ITEM:
                raise InvalidInstance(
                    f"expected an item or sequence delimiter, found ({tag[0]:04X},{tag[1]:04X})"
                )
            if length == _UNDEFINED:
                pos = self.elements(pos, limit, depth, in_item=True, explicit=explicit)
            elif pos + length > limit:
                raise InvalidInstance("a sequence item runs past the end: truncated")
            else:
                pos += length


def check_structure(path: Path, offset: int, *, explicit: bool, little: bool) -> None:
    """Raise :class:`InvalidInstance` unless the data set at ``offset`` ends exactly at EOF."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size == offset:
            raise InvalidInstance("the data set is empty")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _Walker(buf, little).elements(offset, size, depth=0, in_item=False, explicit=explicit)
