"""Whether two stored files hold the same instance in different encodings.

A modality that sends an instance again may encode it differently: implicit instead of
explicit VR, big instead of little endian, with or without group lengths, sequences of
defined or undefined length, the pixels compressed losslessly or not. The bytes differ
but the instance does not, and a sender told "duplicate with different content" for it
retries forever or gives up on a study. Two files are the same instance when every
element (group lengths aside) has the same value and the pixels are the same pixels.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from pacs.stored import read_stored

log = logging.getLogger(__name__)

PIXEL_DATA = 0x7FE00010
# Comparing decodes both copies; beyond this size a different encoding is not looked for.
MAX_COMPARED_BYTES = 256 << 20
LOSSLESS = frozenset(
    {
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEG2000Lossless,
        HTJ2KLossless,
        HTJ2KLosslessRPCL,
        RLELossless,
        DeflatedExplicitVRLittleEndian,
    }
)


def same_instance(first: Path, second: Path) -> bool:
    """True when both files hold equal data sets; False when unsure or unreadable."""
    if max(first.stat().st_size, second.stat().st_size) > MAX_COMPARED_BYTES:
        return False
    try:
        a = read_stored(first, pixels=True)
        b = read_stored(second, pixels=True)
        return _equal_sets(a, b) and _equal_pixels(a, b)
    except Exception as exc:  # an unreadable copy is simply not shown to be the same
        log.debug("cannot compare %s and %s: %s", first.name, second.name, exc)
        return False


def _tags(ds: Dataset) -> list[int]:
    return [int(t) for t in ds.keys() if t.element != 0 and int(t) != PIXEL_DATA]  # noqa: SIM118


def _equal_sets(a: Dataset, b: Dataset) -> bool:
    tags = _tags(a)
    if tags != _tags(b):
        return False
    return all(_equal_elements(a[t], b[t]) for t in tags)


def _equal_elements(a: DataElement, b: DataElement) -> bool:
    if a.VR == "SQ" or b.VR == "SQ":
        items_a = list(a.value or []) if a.VR == "SQ" else None
        items_b = list(b.value or []) if b.VR == "SQ" else None
        if items_a is None or items_b is None or len(items_a) != len(items_b):
            return False
        return all(_equal_sets(x, y) for x, y in zip(items_a, items_b, strict=True))
    if a.VR != b.VR and "UN" in (a.VR, b.VR):
        # An implicit VR copy of an element the dictionary does not know (private).
        return _raw_text(a) == _raw_text(b)
    return bool(_normal(a.value) == _normal(b.value))


def _normal(value: Any) -> Any:
    if isinstance(value, MultiValue | list | tuple):
        return [_normal(v) for v in value]
    if isinstance(value, bytes):
        return value.rstrip(b"\x00 ")
    if isinstance(value, str):
        return value.strip(" \x00")
    return value


def _raw_text(element: DataElement) -> str:
    value = element.value
    if isinstance(value, bytes):
        return value.decode("latin-1").strip(" \x00")
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value).strip(" \x00")


def _equal_pixels(a: Dataset, b: Dataset) -> bool:
    if (PIXEL_DATA in a) != (PIXEL_DATA in b):
        return False
    if PIXEL_DATA not in a:
        return True
    syntax_a = UID(a.file_meta.TransferSyntaxUID)
    syntax_b = UID(b.file_meta.TransferSyntaxUID)
    if syntax_a == syntax_b:
        return bytes(a.PixelData) == bytes(b.PixelData)
    if not all(_lossless(s) for s in (syntax_a, syntax_b)):
        return False
    return bool(np.array_equal(a.pixel_array, b.pixel_array))


def _lossless(syntax: UID) -> bool:
    return not syntax.is_compressed or bool(syntax in LOSSLESS)
