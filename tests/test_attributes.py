"""The header's DICOM JSON (PS3.18 F.2) read from raw bytes equals pydicom's conversion."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from pacs.attributes import dataset_json

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _read(path: Path) -> Dataset | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            return None


def _files() -> list[Path]:
    return sorted(p for p in TEST_FILES.rglob("*") if p.is_file() and p.suffix != ".py")


def test_raw_reading_is_pydicoms_json_for_every_test_file() -> None:
    """Every file pydicom ships (many vendors, both VR encodings, big endian, odd
    padding, wrong lengths): the same JSON with the raw fast path as without it."""
    compared = 0
    for path in _files():
        fast, slow = _read(path), _read(path)
        if fast is None or slow is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                expected = dataset_json(slow, None, raw=False)
            except Exception:
                continue
            assert dataset_json(fast, None) == expected, path.name
        compared += 1
    assert compared > 100


@pytest.mark.parametrize(
    ("vr", "raw", "value"),
    [
        ("CS", b"ORIGINAL\\PRIMARY\\AXIAL ", ["ORIGINAL", "PRIMARY", "AXIAL"]),
        ("CS", b"A\\\\B ", ["A", None, "B"]),  # F.2.5: an empty value inside is null
        ("UI", b"1.2.3\x00", ["1.2.3"]),
        ("DA", b"        ", None),  # only padding: present, no value
        ("US", b"\x01\x00\x02\x00", [1, 2]),
        ("FD", b"\x00\x00\x00\x00\x00\x00\xf8?", [1.5]),
        ("DS", b" 1.5\\-2E3 ", [1.5, -2000.0]),
        ("IS", b"+12 ", [12]),
        ("LO", b"A\\\\B ", ["A", None, "B"]),
        ("LT", b"one\\line ", ["one\\line"]),  # LT is one value, backslashes and all
        ("PN", b"Doe^John=\xc9 ", [{"Alphabetic": "Doe^John", "Ideographic": "\xc9"}]),
    ],
)
def test_simple_values_from_bytes(vr: str, raw: bytes, value: list[object] | None) -> None:
    # As pydicom leaves an element it has read but not yet converted.
    tag = Tag(0x00091010)
    ds = Dataset()
    ds._dict[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
    expected = {"vr": vr} if value is None else {"vr": vr, "Value": value}
    assert dataset_json(ds, None)["00091010"] == expected
    assert dataset_json(ds, None, raw=False)["00091010"] == expected  # pydicom's own
