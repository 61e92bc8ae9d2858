"""WADO-RS metadata: a stored instance as DICOM JSON (PS3.18 F.2) with BulkDataURIs.

Pixel Data is never read for this: the header is parsed up to it, and its BulkDataURI
is given from where it lies in the file. Other binary values larger than
:data:`BULK_THRESHOLD` become BulkDataURIs whose path names the element, through any
sequences (``.../bulkdata/00540016/0/00181071``), so each one can be fetched alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from pacs.errors import MalformedRequest, NotFound
from pacs.pixels import PIXEL_DATA, StoredImage

log = logging.getLogger(__name__)

BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
BULK_THRESHOLD = 1024
_CHARSET = 0x00080005

BulkPath = tuple[int, ...]


def instance_json(image: StoredImage, instance_url: str) -> dict[str, Any]:
    """The metadata of one stored instance; values are UTF-8, as JSON requires."""

    def uri(path: BulkPath) -> str:
        return f"{instance_url}/bulkdata/{format_path(path)}"

    out = dataset_json(image.header, uri, ())
    if image.has_pixels:
        bits = int(image.header.get("BitsAllocated", 8))
        vr = "OB" if image.encapsulated or bits <= 8 else "OW"
        out[f"{PIXEL_DATA:08X}"] = {"vr": vr, "BulkDataURI": uri((PIXEL_DATA,))}
    return dict(sorted(out.items()))


def dataset_json(ds: Dataset, uri: Callable[[BulkPath], str], path: BulkPath) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset yields elements)
        key = f"{tag:08X}"
        try:
            element = ds[tag]
            out[key] = _element_json(element, uri, (*path, int(tag)))
        except Exception as exc:  # a value pydicom cannot convert: say so, keep the rest
            log.warning("metadata: element %s left empty: %s", key, exc)
            out[key] = {"vr": "UN"}
    return out


def _element_json(
    element: DataElement, uri: Callable[[BulkPath], str], path: BulkPath
) -> dict[str, Any]:
    if element.tag == _CHARSET:
        # Values were decoded with the stored character set; JSON carries them as UTF-8.
        return {"vr": "CS", "Value": ["ISO_IR 192"]}
    if element.VR == "SQ":
        items = [dataset_json(item, uri, (*path, n)) for n, item in enumerate(element.value or [])]
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
    if element.VR in BULK_VRS and element.value is not None and len(element.value) > BULK_THRESHOLD:
        return {"vr": element.VR, "BulkDataURI": uri(path)}
    return element.to_json_dict(None, BULK_THRESHOLD)


def format_path(path: BulkPath) -> str:
    """Tags as 8 hex digits and item numbers as decimals, alternating."""
    return "/".join(f"{p:08X}" if n % 2 == 0 else str(p) for n, p in enumerate(path))


def parse_path(text: str) -> BulkPath:
    parts = [p for p in text.split("/") if p]
    if not parts or len(parts) % 2 == 0:
        raise MalformedRequest(f"bulk data path {text!r} must be tag(/item/tag)*")
    path: list[int] = []
    for n, part in enumerate(parts):
        try:
            path.append(int(part, 16) if n % 2 == 0 else int(part, 10))
        except ValueError as exc:
            raise MalformedRequest(f"bulk data path {text!r}: {part!r} is not valid") from exc
        if n % 2 == 0 and len(part) != 8:
            raise MalformedRequest(f"bulk data path {text!r}: tags have 8 hex digits")
    return tuple(path)


def bulk_value(ds: Dataset, path: BulkPath) -> bytes:
    """The raw value of a binary element named by a bulk data path."""
    current: Dataset = ds
    for n in range(0, len(path) - 1, 2):
        tag: BaseTag = Tag(path[n])
        element = current.get(tag)
        if element is None or element.VR != "SQ" or path[n + 1] >= len(element.value):
            raise NotFound(f"no bulk data at {format_path(path)}")
        current = element.value[path[n + 1]]
    element = current.get(Tag(path[-1]))
    if element is None or element.VR not in BULK_VRS or element.value is None:
        raise NotFound(f"no bulk data at {format_path(path)}")
    value = element.value
    return bytes(value) if not isinstance(value, bytes) else value
