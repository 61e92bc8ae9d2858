"""The header's DICOM JSON (PS3.18 F.2) read from raw bytes equals pydicom's conversion."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from pacs.attributes import _sequence_json, collected_json, dataset_json
from pacs.part10 import read_file_meta
from pacs.structure import Elements, collect_header

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


def _with_sequences(undefined: bool) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jörg"
    code = Dataset()
    code.add_new(0x00080000, "UL", 40)  # a group length inside an item
    code.CodeValue = "T-D3000"
    code.CodingSchemeDesignator = "SRT"
    code.CodeMeaning = "Brustkörper"
    code.ViewModifierCodeSequence = []
    nested = Dataset()
    nested.CodeValue = "R-10206"
    nested.CodeMeaning = ""
    nested.ReferencedFrameNumber = [1, 2]
    code.PurposeOfReferenceCodeSequence = [nested, Dataset()]
    ds.ViewCodeSequence = [code]
    ds.ReferencedStudySequence = [Dataset()]
    own = Dataset()  # an item with a character set of its own (PS3.5 6.1.2.5.1)
    own.SpecificCharacterSet = "ISO_IR 192"
    own.PatientID = "Ελληνικά"
    ds.OtherPatientIDsSequence = [own]
    for element in ds.iterall():
        if element.VR == "SQ":
            element.is_undefined_length = undefined
            for item in element.value:
                item.is_undefined_length_sequence_item = undefined
    return ds


def _collected(path: Path, ds: Dataset) -> Elements:
    """``ds`` written to ``path`` as Explicit VR Little Endian, and its elements as the
    length-checked walk collects them."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    with path.open("rb") as stream:
        read_file_meta(stream)
        offset = stream.tell()
    elements = collect_header(path, offset, defer_size=None)
    assert elements is not None
    return elements


@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined"])
def test_sequences_read_from_bytes_are_pydicoms(tmp_path: Path, undefined: bool) -> None:
    """Sequences (PS3.5 7.5) of both lengths, nested, empty, with empty items, a group
    length inside an item and text in the data set's character set are read from their
    bytes; an item with a character set of its own is left to pydicom. Either way the
    JSON is what pydicom converts."""
    path = tmp_path / "sequences.dcm"
    elements = _collected(path, _with_sequences(undefined))
    fast = dataset_json(Dataset(dict(elements)), None)
    assert fast == dataset_json(pydicom.dcmread(path), None, raw=False)
    assert fast["00540220"]["Value"][0]["00080104"] == {
        "vr": "LO",
        "Value": ["Brustkörper"],
    }

    def raw_sequence(keyword: str) -> bytes:
        value = elements[Tag(keyword)].value
        assert isinstance(value, bytes)
        return value

    assert _sequence_json(raw_sequence("ViewCodeSequence"), "latin-1") is not None
    assert _sequence_json(raw_sequence("ReferencedStudySequence"), "latin-1") == {
        "vr": "SQ",
        "Value": [{}],
    }
    assert _sequence_json(raw_sequence("OtherPatientIDsSequence"), "latin-1") is None


def test_a_plain_header_is_converted_without_building_a_data_set(tmp_path: Path) -> None:
    """The collected elements of a header whose every value the fast path takes give
    pydicom's JSON without pydicom building a Dataset; one that needs pydicom (an item
    with its own character set) has it built, once."""
    plain = _with_sequences(undefined=True)
    del plain.OtherPatientIDsSequence
    elements = _collected(tmp_path / "plain.dcm", plain)

    def never() -> Dataset:
        raise AssertionError("the fast path needed a Dataset")

    expected = dataset_json(pydicom.dcmread(tmp_path / "plain.dcm"), None, raw=False)
    assert collected_json(elements, never) == expected

    elements = _collected(tmp_path / "own.dcm", _with_sequences(undefined=False))
    built: list[Dataset] = []

    def build() -> Dataset:
        built.append(Dataset(dict(elements)))
        return built[-1]

    expected = dataset_json(pydicom.dcmread(tmp_path / "own.dcm"), None, raw=False)
    assert collected_json(elements, build) == expected
    assert len(built) == 1
