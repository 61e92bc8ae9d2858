"""A stored header as DICOM JSON (PS3.18 F.2): the one encoding of attribute values.

Values are decoded with the stored Specific Character Set and carried as UTF-8, as JSON
is; the Specific Character Set itself is kept as stored, since it "reflects the
character encoding of the source DICOM dataset" (F.2.2 note 3).

The index keeps a column for the keys it matches often; every other attribute a query
asks for is answered from this JSON, kept compressed per instance, so that an answer is
true to what was stored whatever it names. WADO-RS metadata uses the same conversion
of elements. Values that pydicom cannot convert as their VR says (an IS of "1A", a DS
of "1,5") are kept as the text that was sent rather than dropped: F.2.6 lets a number
that is not valid for its VR be sent as a string.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from pacs.encoding import (
    ITEM,
    ITEM_DELIMITATION,
    LONG_LENGTH_VR_CODES,
    NUMBER_FORMATS,
    SEQUENCE_DELIMITATION,
    UNDEFINED_LENGTH,
)
from pacs.structure import MAX_SEQUENCE_DEPTH

log = logging.getLogger(__name__)

BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
BULK_THRESHOLD = 1024
PIXEL_DATA = 0x7FE00010
_NUMERIC = frozenset({"IS", "DS"})
_STRINGS = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)

# Values read straight from the bytes when an element is still raw: VRs whose text is
# ASCII by definition (PS3.5 6.2, not affected by the Specific Character Set), binary
# numbers, decimal and integer strings in their plain forms, and text when the data
# set's character set is one Python decodes alone (the default repertoire, Latin-1,
# UTF-8; never ISO 2022 code extensions). Everything else goes through pydicom. Both
# give the same JSON (a test holds them together over pydicom's test files); this one
# skips building DataElements.
_ASCII_VRS = frozenset({"AS", "CS", "DA", "DT", "TM", "UI"})
_MULTI_TEXT_VRS = frozenset({"LO", "SH", "UC"})
_SINGLE_TEXT_VRS = frozenset({"LT", "ST", "UT"})
# An empty value of these VRs is an attribute without a "Value" (F.2.2), whatever the
# character set.
_EMPTY_AS_NO_VALUE = frozenset(
    {*_ASCII_VRS, *NUMBER_FORMATS, *_MULTI_TEXT_VRS, *_SINGLE_TEXT_VRS, "PN", "DS", "IS", "SQ"}
)
_CODECS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")
_SPECIFIC_CHARACTER_SET = 0x00080005
# Sequence items (PS3.5 7.5), read from bytes by the fast path.
_ITEM_HEAD = struct.Struct("<HHL")
_ELEMENT_HEAD = struct.Struct("<HH2sH")
_LONG_LENGTH = struct.Struct("<L")

BulkPath = tuple[int, ...]
BulkURI = Callable[[BulkPath], str]


def dataset_json(
    ds: Dataset,
    uri: BulkURI | None,
    path: BulkPath = (),
    *,
    raw: bool = True,
    codec: str | None = "latin-1",
) -> dict[str, Any]:
    """Every element of ``ds`` except group lengths (PS3.18 F.2: "shall not be included").

    ``uri`` names where a large binary value can be fetched (WADO-RS bulk data); without
    one, such values are left out (they are never matched or returned by a query).
    ``raw``: read the simple VRs of unconverted elements from their bytes. ``codec``:
    how the text of the enclosing data set is decoded, which an item inherits unless it
    names its own character set (None: only pydicom decodes it).
    """
    out: dict[str, Any] = {}
    if raw and _SPECIFIC_CHARACTER_SET in ds:
        codec = _codec(ds.get_item(_SPECIFIC_CHARACTER_SET))
    # items(): the elements as read, unconverted (a deferred value is read below, by
    # pydicom, only when the fast path cannot take it).
    for tag, stored in ds.items():
        if tag.element == 0 or (tag == PIXEL_DATA and not path):
            continue  # the image's own Pixel Data is described by WADO-RS apart
        key = f"{tag:08X}"
        if raw and isinstance(stored, RawDataElement):
            fast = _raw_json(stored, codec)
            if fast is not None:
                out[key] = fast
                continue
        converted = _converted(ds, tag, uri, path, raw=raw, codec=codec)
        if converted is not None:
            out[key] = converted
    return dict(sorted(out.items()))


def collected_json(
    elements: Mapping[BaseTag, RawDataElement], data_set: Callable[[], Dataset]
) -> dict[str, Any]:
    """:func:`dataset_json` (without bulk data) of a data set still in the elements
    collected on the length-checked walk (:func:`pacs.structure.collect_header`).

    Each element is read from its bytes; only when one cannot be is the pydicom data
    set built (``data_set``) to convert it, which most headers never need.
    """
    codec: str | None = "latin-1"
    if _SPECIFIC_CHARACTER_SET in elements:
        codec = _codec(elements[BaseTag(_SPECIFIC_CHARACTER_SET)])
    out: dict[str, Any] = {}
    ds: Dataset | None = None
    for tag, stored in elements.items():
        if tag.element == 0 or tag == PIXEL_DATA:
            continue
        converted = _raw_json(stored, codec)
        if converted is None:
            ds = data_set() if ds is None else ds
            converted = _converted(ds, tag, None, (), raw=True, codec=codec)
        if converted is not None:
            out[f"{tag:08X}"] = converted
    return dict(sorted(out.items()))


def _converted(
    ds: Dataset, tag: BaseTag, uri: BulkURI | None, path: BulkPath, *, raw: bool, codec: str | None
) -> dict[str, Any] | None:
    """An element of ``ds`` as pydicom converts it, then as JSON."""
    try:
        element = ds[tag]
    except Exception as exc:  # a raw element pydicom cannot convert at all
        log.debug("element %08X could not be read: %s", tag, exc)
        return {"vr": "UN"}
    return element_json(element, uri, (*path, int(tag)), raw=raw, codec=codec)


def element_json(
    element: DataElement,
    uri: BulkURI | None,
    path: BulkPath,
    *,
    raw: bool = True,
    codec: str | None = None,
) -> dict[str, Any] | None:
    vr = str(element.VR)
    if vr == "SQ":
        items = [
            dataset_json(item, uri, (*path, n), raw=raw, codec=codec)
            for n, item in enumerate(element.value or [])
        ]
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
    value = element.value
    if vr in BULK_VRS or " or " in vr:
        if value is None or len(value) == 0:
            return {"vr": vr[:2]}
        if len(value) > BULK_THRESHOLD // 4 * 3:  # its base64 over BULK_THRESHOLD, as pydicom
            return None if uri is None else {"vr": vr[:2], "BulkDataURI": uri(path)}
    try:
        converted: dict[str, Any] = element.to_json_dict(None, BULK_THRESHOLD)
    except Exception:
        converted = _as_sent(element)
    return _nulls_for_empty_values(converted)


def _codec(element: Any) -> str | None:
    """The Python codec of a Specific Character Set that needs nothing else; None.

    Raw or already converted: pydicom converts this element as soon as anything asks a
    data set for its encoding. Several values (ISO 2022 code extensions) give None."""
    value = element.value if isinstance(element, RawDataElement | DataElement) else None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None
    return _CODECS.get(value.strip(" \x00"))


def _raw_json(element: RawDataElement, codec: str | None = None) -> dict[str, Any] | None:
    """An explicit-VR little-endian element of a simple VR as JSON; None for pydicom."""
    vr = element.VR
    value = element.value
    if (
        vr is None
        or element.is_implicit_VR
        or not element.is_little_endian
        or (value is None and element.length)
    ):
        return None
    if not value:
        return {"vr": vr} if vr in _EMPTY_AS_NO_VALUE else None
    if vr == "SQ":
        return _sequence_json(value, codec) if isinstance(value, bytes) else None
    if vr in ("DS", "IS"):
        return _number_strings(vr, value)
    if codec is not None and (vr in _MULTI_TEXT_VRS or vr in _SINGLE_TEXT_VRS or vr == "PN"):
        return _text_json(vr, value, codec)
    if vr in _ASCII_VRS:
        # As pydicom's multi_string: trailing padding off, then split on backslashes.
        items = value.decode("latin-1").rstrip(" \x00").split("\\")
        if len(items) == 1:
            return {"vr": vr, "Value": items} if items[0] else {"vr": vr}
        return {"vr": vr, "Value": [item or None for item in items]}
    code = NUMBER_FORMATS.get(vr)
    if code is None:
        return None
    size = struct.calcsize(code)
    if len(value) % size:
        return None  # pydicom refuses it; its handling applies
    numbers = list(struct.unpack(f"<{len(value) // size}{code[1:]}", value))
    return {"vr": vr, "Value": numbers}


def _sequence_json(value: bytes, codec: str | None) -> dict[str, Any] | None:
    """A sequence's items read from its bytes (explicit VR little endian: the items of a
    defined-length sequence, or of an undefined-length one without its delimiter), each
    item as :func:`dataset_json` gives it; None when anything in them is pydicom's to
    read: an item with a character set of its own, an element the fast path does not
    take, a structure that is not plain."""
    try:
        parsed = _items(value, 0, len(value), codec, 0, delimited=False)
    except struct.error:
        return None
    if parsed is None:
        return None
    items = parsed[0]
    return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}


def _items(
    data: bytes, pos: int, limit: int, codec: str | None, depth: int, *, delimited: bool
) -> tuple[list[dict[str, Any]], int] | None:
    """The items from ``pos`` to ``limit``, or to the sequence delimiter when
    ``delimited`` (an undefined-length sequence); with the position after them."""
    if depth > MAX_SEQUENCE_DEPTH:
        return None
    items: list[dict[str, Any]] = []
    while pos + 8 <= limit:
        group, element, length = _ITEM_HEAD.unpack_from(data, pos)
        pos += 8
        if (group, element) == SEQUENCE_DELIMITATION and delimited:
            return items, pos
        if (group, element) != ITEM:
            return None
        if length == UNDEFINED_LENGTH:
            parsed = _item(data, pos, limit, codec, depth, delimited=True)
        elif pos + length > limit:
            return None
        else:
            parsed = _item(data, pos, pos + length, codec, depth, delimited=False)
        if parsed is None:
            return None
        item, pos = parsed
        items.append(item)
    return (items, pos) if pos == limit and not delimited else None


def _item(
    data: bytes, pos: int, limit: int, codec: str | None, depth: int, *, delimited: bool
) -> tuple[dict[str, Any], int] | None:
    """One item's elements to ``limit``, or to its delimiter when ``delimited``."""
    out: dict[str, Any] = {}
    while pos + 8 <= limit:
        group, element, vr_code, length = _ELEMENT_HEAD.unpack_from(data, pos)
        if group == 0xFFFE:
            if delimited and element == ITEM_DELIMITATION[1]:
                return dict(sorted(out.items())), pos + 8
            return None
        if vr_code in LONG_LENGTH_VR_CODES:
            if pos + 12 > limit:
                return None
            (length,) = _LONG_LENGTH.unpack_from(data, pos + 8)
            pos += 12
        else:
            pos += 8
        tag = group << 16 | element
        key = f"{tag:08X}"
        if tag == _SPECIFIC_CHARACTER_SET or key in out:
            return None  # its own character set, or a tag twice: pydicom reads the item
        vr = vr_code.decode("latin-1")
        converted: dict[str, Any] | None
        if vr == "SQ":
            undefined = length == UNDEFINED_LENGTH
            if not undefined and pos + length > limit:
                return None
            end = limit if undefined else pos + length
            nested = _items(data, pos, end, codec, depth + 1, delimited=undefined)
            if nested is None:
                return None
            values, pos = nested
            converted = {"vr": "SQ", "Value": values} if values else {"vr": "SQ"}
        elif length == UNDEFINED_LENGTH or pos + length > limit:
            return None
        else:
            raw = RawDataElement(
                BaseTag(tag), vr, length, data[pos : pos + length], pos, False, True
            )
            pos += length
            converted = _raw_json(raw, codec)
        if converted is None:
            return None
        if element != 0:  # group lengths are never in DICOM JSON (F.2)
            out[key] = converted
    if delimited or pos != limit:
        return None
    return dict(sorted(out.items())), pos


def _number_strings(vr: str, value: bytes) -> dict[str, Any] | None:
    """DS and IS in their plain forms as JSON numbers (F.2.3.1); anything else (an empty
    value among others, "1,5", "NaN") is pydicom's to judge."""
    items = value.decode("latin-1").strip(" \x00").split("\\")
    if items == [""]:
        return {"vr": vr}
    pattern = _DECIMAL if vr == "DS" else _INTEGER
    stripped = [item.strip(" \x00") for item in items]
    if not all(pattern.fullmatch(item) for item in stripped):
        return None
    if vr == "DS":
        return {"vr": vr, "Value": [float(item) for item in stripped]}
    return {"vr": vr, "Value": [int(item) for item in stripped]}


def _text_json(vr: str, value: bytes, codec: str) -> dict[str, Any] | None:
    """Text decoded as pydicom does for these VRs (values.convert_text,
    convert_single_string, convert_PN) with a single-byte or UTF-8 character set."""
    try:
        text = (value.rstrip(b"\x00 ") if vr == "PN" else value).decode(codec)
    except UnicodeDecodeError:
        return None  # pydicom's replacement rules apply
    if vr in _SINGLE_TEXT_VRS:
        text = text.rstrip("\x00 ")
        return {"vr": vr, "Value": [text]} if text else {"vr": vr}
    if vr == "PN":
        if not text:
            return {"vr": vr}
        names = []
        for name in text.split("\\"):
            groups = name.split("=")
            if len(groups) > 3:
                return None
            names.append(dict(zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False)))
        return {"vr": vr, "Value": names}
    items = [item.rstrip("\x00 ") for item in text.split("\\")]
    if len(items) == 1:
        return {"vr": vr, "Value": items} if items[0] else {"vr": vr}
    return {"vr": vr, "Value": [item or None for item in items]}


def _as_sent(element: DataElement) -> dict[str, Any]:
    """A value pydicom cannot convert as its VR says, as the text that was sent."""
    vr = str(element.VR)
    value = element.value
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    if vr in _NUMERIC or vr in _STRINGS:
        return {"vr": vr, "Value": [None if v in (None, "") else str(v) for v in values]}
    return {"vr": vr}


def _nulls_for_empty_values(converted: dict[str, Any]) -> dict[str, Any]:
    """PS3.18 F.2.5: an empty value inside a multi-valued element is ``null``."""
    values = converted.get("Value")
    if isinstance(values, list) and len(values) > 1:
        converted["Value"] = [None if v == "" else v for v in values]
    return converted


def pack(attributes: Mapping[str, Any]) -> bytes:
    return zlib.compress(json.dumps(attributes, separators=(",", ":")).encode(), 6)


def unpack(data: bytes | None) -> dict[str, Any]:
    if not data:
        return {}
    unpacked: dict[str, Any] = json.loads(zlib.decompress(data))
    return unpacked


def values(attributes: Mapping[str, Any], tag: str) -> list[Any] | None:
    """The JSON values of an attribute; None when absent, [] when present but empty."""
    element = attributes.get(tag)
    if element is None:
        return None
    found: list[Any] = element.get("Value") or []
    return found


def text_values(attributes: Mapping[str, Any], tag: str) -> list[str] | None:
    """Values as DICOM text (person names in their ``=``-joined form), for matching."""
    found = values(attributes, tag)
    if found is None:
        return None
    texts = []
    for value in found:
        if value is None:
            texts.append("")
        elif isinstance(value, dict):
            groups = [value.get(k, "") for k in ("Alphabetic", "Ideographic", "Phonetic")]
            texts.append("=".join(groups).rstrip("="))
        else:
            texts.append(str(value))
    return texts


class StoredValues(Mapping[str, str | None]):
    """Header values by DICOM keyword, read from a data set's DICOM JSON (PS3.18 F.2):
    None when absent, several values joined by a backslash as DICOM encodes them."""

    def __init__(self, attributes: Mapping[str, Any]) -> None:
        self._attributes = attributes

    def __getitem__(self, keyword: str) -> str | None:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise KeyError(keyword)
        found = text_values(self._attributes, f"{tag:08X}")
        if found is None:
            raise KeyError(keyword)
        return "\\".join(found)

    def __iter__(self) -> Iterator[str]:
        return (k for t in self._attributes if (k := keyword_for_tag(int(t, 16))))

    def __len__(self) -> int:
        return sum(1 for _ in self)
