"""A data set encoded once, with named holes for the values that change between uses.

Reports of one model differ only in a few values (UIDs, probabilities, regions) and in
which items a sequence holds, yet building and encoding them as pydicom trees costs
more than the model. Here a tree is encoded once, by pydicom, into literal bytes; the
elements whose value is one of the given placeholders become holes, and sequence items
equal to a given marker become splices. :func:`assemble` fills them and works out the
lengths again. The encoding is explicit VR little endian with defined lengths, byte for
byte what pydicom writes for the same tree, so a reader can skip a sequence without
parsing it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element

_ITEM = b"\xfe\xff\x00\xe0"


@dataclass(frozen=True)
class Hole:
    """An element whose value is given when the fragments are assembled."""

    tag: int
    VR: str
    name: str


@dataclass(frozen=True)
class Splice:
    """Items of a sequence given, already encoded, when the fragments are assembled."""

    name: str


@dataclass(frozen=True)
class Nest:
    """A sequence that holds a hole or a splice somewhere below it."""

    tag: int
    items: tuple[Fragments | Splice, ...]


Piece = bytes | Hole | Nest
Fragments = tuple[Piece, ...]


def placeholder_key(VR: str, value: Any) -> tuple[str, Any]:
    """How a placeholder value is recognised in an element: its VR and its value."""
    if VR in ("FL", "FD", "DS"):
        values = value if isinstance(value, Sequence | list) else [value]
        return VR, tuple(float(v) for v in values)
    return VR, str(value)


def compile_dataset(
    ds: Dataset,
    holes: Mapping[tuple[str, Any], str],
    splices: Sequence[tuple[Callable[[Dataset], bool], str]] = (),
    encodings: list[str] | None = None,
) -> Fragments:
    """``ds`` encoded, with an element whose :func:`placeholder_key` is in ``holes`` left
    as that hole, and a sequence item for which a splice's predicate holds left as that
    splice."""
    pieces: list[Piece] = []
    for element in ds:
        if element.VR == "SQ":
            items: list[Fragments | Splice] = []
            for item in element.value:
                splice = next((name for match, name in splices if match(item)), None)
                items.append(
                    Splice(splice) if splice else compile_dataset(item, holes, splices, encodings)
                )
            pieces.append(Nest(element.tag, tuple(items)))
            continue
        name = None
        if element.value is not None and element.VM > 0:
            name = holes.get(placeholder_key(element.VR, element.value))
        if name is not None:
            pieces.append(Hole(element.tag, element.VR, name))
        else:
            pieces.append(encode_element(element, encodings))
    return _merged(pieces)


def assemble(
    pieces: Fragments,
    values: Mapping[str, Any],
    spliced: Mapping[str, Sequence[bytes]] | None = None,
) -> bytes:
    """The encoded data set: holes filled from ``values``, splices from ``spliced``
    (encoded item bodies, zero or more each)."""
    spliced = spliced or {}
    out = []
    for piece in pieces:
        if isinstance(piece, bytes):
            out.append(piece)
        elif isinstance(piece, Hole):
            out.append(encode_value(piece.tag, piece.VR, values[piece.name]))
        else:
            bodies: list[bytes] = []
            for item in piece.items:
                if isinstance(item, Splice):
                    bodies.extend(spliced[item.name])
                else:
                    bodies.append(assemble(item, values, spliced))
            out.append(sequence(piece.tag, bodies))
    return b"".join(out)


def sequence(tag: int, bodies: Sequence[bytes]) -> bytes:
    """A sequence element of defined length around encoded item bodies."""
    items = b"".join(_ITEM + struct.pack("<I", len(body)) + body for body in bodies)
    return _tag(tag) + b"SQ\0\0" + struct.pack("<I", len(items)) + items


def encode_element(element: DataElement, encodings: list[str] | None = None) -> bytes:
    """One element as pydicom writes it (explicit VR little endian)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_data_element(fp, element, encodings)
    return fp.getvalue()


def encode_value(tag: int, VR: str, value: Any) -> bytes:
    """A hole's element: the VRs a report's varying values have, encoded directly (the
    same bytes as pydicom's, which :func:`encode_element` gives for anything else)."""
    if VR == "UI":
        data = str(value).encode("ascii")
        data += b"\0" * (len(data) % 2)
    elif VR == "DS":
        data = str(value).encode("ascii")
        data += b" " * (len(data) % 2)
    elif VR in ("FD", "FL"):
        numbers = list(value) if isinstance(value, Sequence | list) else [value]
        data = struct.pack(f"<{len(numbers)}{'d' if VR == 'FD' else 'f'}", *numbers)
    else:
        return encode_element(DataElement(tag, VR, value))
    return _tag(tag) + VR.encode("ascii") + struct.pack("<H", len(data)) + data


def _tag(tag: int) -> bytes:
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF)


def _merged(pieces: list[Piece]) -> Fragments:
    """Adjacent literals joined; a sequence with nothing left to fill becomes literal."""
    out: list[Piece] = []
    for piece in pieces:
        literal = _literal(piece)
        if literal is not None and out and isinstance(out[-1], bytes):
            out[-1] += literal
        else:
            out.append(piece if literal is None else literal)
    return tuple(out)


def _literal(piece: Piece) -> bytes | None:
    """The bytes of a piece with nothing to fill, else None."""
    if isinstance(piece, bytes):
        return piece
    if isinstance(piece, Hole):
        return None
    bodies = []
    for item in piece.items:
        if isinstance(item, Splice) or not all(isinstance(p, bytes) for p in item):
            return None
        bodies.append(b"".join(item))  # type: ignore[arg-type]
    return sequence(piece.tag, bodies)
