"""WADO-RS metadata: a stored instance as DICOM JSON (PS3.18 F.2) with BulkDataURIs.

Pixel Data is never read for this: the header is parsed up to it, and its BulkDataURI
is given from where it lies in the file. Other binary values larger than
:data:`pacs.attributes.BULK_THRESHOLD` become BulkDataURIs whose path names the element, through any
sequences (``.../bulkdata/00540016/0/00181071``), so each one can be fetched alone.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from pacs.attributes import BULK_VRS, BulkPath, dataset_json
from pacs.errors import MalformedRequest, NotFound
from pacs.pixels import PIXEL_DATA, StoredImage

log = logging.getLogger(__name__)
_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_ITEM_NUMBER = re.compile(r"[0-9]{1,6}")


def instance_json(image: StoredImage, instance_url: str) -> dict[str, Any]:
    """The metadata of one stored instance; values are UTF-8, as JSON requires."""

    def uri(path: BulkPath) -> str:
        return f"{instance_url}/bulkdata/{format_path(path)}"

    out = dataset_json(image.header, uri)
    if image.has_pixels:
        # The VR the Pixel Data was stored with (PS3.18 F.2: metadata is what was stored).
        out[f"{PIXEL_DATA:08X}"] = {"vr": image.pixel_vr, "BulkDataURI": uri((PIXEL_DATA,))}
    return dict(sorted(out.items()))


def format_path(path: BulkPath) -> str:
    """Tags as 8 hex digits and item numbers as decimals, alternating."""
    return "/".join(f"{p:08X}" if n % 2 == 0 else str(p) for n, p in enumerate(path))


def parse_path(text: str) -> BulkPath:
    parts = [p for p in text.split("/") if p]
    if not parts or len(parts) % 2 == 0:
        raise MalformedRequest(f"bulk data path {text!r} must be tag(/item/tag)*")
    path: list[int] = []
    for n, part in enumerate(parts):
        valid = _TAG.fullmatch(part) if n % 2 == 0 else _ITEM_NUMBER.fullmatch(part)
        if valid is None:
            kind = "a tag of 8 hex digits" if n % 2 == 0 else "an item number"
            raise MalformedRequest(f"bulk data path {text[:80]!r}: {part[:20]!r} is not {kind}")
        path.append(int(part, 16) if n % 2 == 0 else int(part, 10))
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
