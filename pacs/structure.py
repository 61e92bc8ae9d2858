"""A length-checked walk over an encoded data set, before anything trusts its lengths.

pydicom is lenient by design: a value that runs past the end of the file or a sequence
without its delimiter is read short, or dropped with a warning. An archive must refuse
such an instance instead of acknowledging a truncated copy, so every element length and
every undefined-length sequence is checked here against the real end of the bytes.

The walk over an Explicit VR Little Endian data set (what nearly every modality sends)
can also collect its top-level elements up to Pixel Data as pydicom's reader would
yield them (:func:`collect_header`), so that ingest reads the header once instead of
walking it here and again in pydicom.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.filereader import ENCODED_VR
from pydicom.tag import BaseTag

from pacs.encoding import (
    ITEM,
    ITEM_DELIMITATION,
    LONG_LENGTH_VR_CODES,
    SEQUENCE_DELIMITATION,
    UNDEFINED_LENGTH,
)
from pacs.errors import InvalidInstance

MAX_SEQUENCE_DEPTH = 32
# Where pydicom stops reading a header: Pixel Data, Float and Double Float Pixel Data.
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_SPECIFIC_CHARACTER_SET = 0x00080005

Elements = dict[BaseTag, RawDataElement]


class _Collector:
    """The top-level elements before Pixel Data, as pydicom's ``data_element_generator``
    yields them for Explicit VR Little Endian; ``usable`` turns False at anything it
    would read differently (a VR it does not know, an undefined length on anything but
    a sequence), and the caller leaves the whole header to pydicom."""

    def __init__(self, defer_size: int | None) -> None:
        self.defer_size = defer_size
        self.elements: Elements = {}
        self.usable = True
        self.done = False
        self.buf: mmap.mmap | bytes = b""  # the bytes walked, set by the walk

    def add(self, tag: int, vr: bytes, length: int, start: int, end: int) -> None:
        buf = self.buf
        if tag in PIXEL_TAGS:
            self.done = True
            return
        if vr not in ENCODED_VR:
            self.usable = False
            return
        name = vr.decode("ascii")
        if length == UNDEFINED_LENGTH:
            if name != "SQ":
                self.usable = False
                return
            # The items without the sequence delimiter: converted when used, as pydicom
            # converts a sequence of defined length.
            value: Any = buf[start : end - 8]
        elif length == 0:
            value = empty_value_for_VR(name, raw=True)
        elif (
            self.defer_size is not None
            and length > self.defer_size
            and tag != _SPECIFIC_CHARACTER_SET
        ):
            value = None  # read from the file when used
        else:
            value = buf[start:end]
        self.elements[BaseTag(tag)] = RawDataElement(
            BaseTag(tag), name, length, value, start, False, True
        )


class _Walker:
    def __init__(
        self, buf: mmap.mmap | bytes, little: bool, collector: _Collector | None = None
    ) -> None:
        self.buf = buf
        order = "<" if little else ">"
        # Tag, VR and 2-byte length (explicit VR); tag and 4-byte length (implicit VR,
        # items); a 4-byte length after a VR that has one.
        self._explicit = struct.Struct(order + "HH2sH")
        self._implicit = struct.Struct(order + "HHL")
        self._long = struct.Struct(order + "L")
        self.collector = collector
        if collector is not None:
            collector.buf = buf

    def elements(self, pos: int, limit: int, depth: int, in_item: bool, explicit: bool) -> int:
        """Skip elements up to ``limit`` (or an item delimiter); return the end position."""
        buf = self.buf
        explicit_head = self._explicit.unpack_from
        implicit_head = self._implicit.unpack_from
        long_length = self._long.unpack_from
        collector = self.collector if depth == 0 else None
        while pos < limit:
            if pos + 8 > limit:
                raise InvalidInstance(f"data set is truncated at byte {pos}")
            if explicit:
                group, element, vr, length = explicit_head(buf, pos)
            else:
                group, element, length = implicit_head(buf, pos)
                vr = b""
            if group == 0xFFFE:
                if element == ITEM_DELIMITATION[1]:
                    if in_item:
                        return pos + 8
                    raise InvalidInstance(f"unexpected item delimiter at byte {pos}")
                raise InvalidInstance(f"unexpected item tag ({group:04X},{element:04X})")
            if explicit and vr in LONG_LENGTH_VR_CODES:
                if pos + 12 > limit:
                    raise InvalidInstance(f"data set is truncated at byte {pos}")
                (length,) = long_length(buf, pos + 8)
                pos += 12
            else:
                pos += 8
            start = pos
            if length == UNDEFINED_LENGTH:
                # An undefined-length UN holds implicit VR items (PS3.5 6.2.2).
                pos = self.items(pos, limit, depth + 1, explicit and vr != b"UN")
            elif pos + length > limit:
                raise InvalidInstance(
                    f"element ({group:04X},{element:04X}) claims {length} bytes but only "
                    f"{limit - pos} remain: the data set is truncated"
                )
            else:
                pos += length
            if collector is not None and collector.usable and not collector.done:
                collector.add(group << 16 | element, vr, length, start, pos)
        if in_item:
            raise InvalidInstance("a sequence item is missing its delimiter: truncated")
        return pos

    def items(self, pos: int, limit: int, depth: int, explicit: bool) -> int:
        """Skip the items of an undefined-length sequence or encapsulated pixel data."""
        if depth > MAX_SEQUENCE_DEPTH:
            raise InvalidInstance(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels")
        while True:
            if pos + 8 > limit:
                raise InvalidInstance(f"data set is truncated at byte {pos}")
            group, element, length = self._implicit.unpack_from(self.buf, pos)
            tag = (group, element)
            pos += 8
            if tag == SEQUENCE_DELIMITATION:
                return pos
            if tag != ITEM:
                raise InvalidInstance(
                    f"expected an item or sequence delimiter, found ({group:04X},{element:04X})"
                )
            if length == UNDEFINED_LENGTH:
                pos = self.elements(pos, limit, depth, in_item=True, explicit=explicit)
            elif pos + length > limit:
                raise InvalidInstance("a sequence item runs past the end: truncated")
            else:
                pos += length


def check_structure(path: Path, offset: int, *, explicit: bool, little: bool) -> None:
    """Raise :class:`InvalidInstance` unless the data set at ``offset`` ends exactly at EOF."""
    _walk(path, offset, explicit=explicit, little=little, collector=None)


def collect_header(path: Path, offset: int, *, defer_size: int | None) -> Elements | None:
    """:func:`check_structure` of an Explicit VR Little Endian data set, and its elements
    before Pixel Data as pydicom would read them (values longer than ``defer_size`` left
    in the file); None when pydicom must read them itself."""
    collector = _Collector(defer_size)
    _walk(path, offset, explicit=True, little=True, collector=collector)
    return collector.elements if collector.usable else None


def _walk(
    path: Path, offset: int, *, explicit: bool, little: bool, collector: _Collector | None
) -> None:
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size == offset:
            raise InvalidInstance("the data set is empty")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _Walker(buf, little, collector).elements(
                offset, size, depth=0, in_item=False, explicit=explicit
            )
