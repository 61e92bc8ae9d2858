"""The direct C-FIND identifier encoder against the pydicom path it stands in for."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import encode

from pacs.dimse.find import encode_match
from pacs.dimse.match_encoding import MatchEncoder
from pacs.query import ATTRIBUTES, Level

KEYWORDS = sorted(ATTRIBUTES)
NAMES = ["Smith^Anna", "Müller^Jürgen", "Dubois^Amélie", "山田^太郎", "O'Brien^Sean^^Dr", "Lee"]
TEXT = st.text(alphabet="ABCDEFGHIJ klmnop0123456789-", min_size=1, max_size=16).map(str.strip)
VALUES: dict[str, Any] = {
    "PN": st.sampled_from(NAMES),
    "LO": st.one_of(TEXT, st.sampled_from(["Thorax PA", "Poumons éclairés", "胸部"])),
    "SH": TEXT.map(lambda t: t[:16]),
    "DA": st.sampled_from(["20240301", "19991231"]),
    "TM": st.sampled_from(["101500", "080000.123"]),
    "CS": st.sampled_from(["CT", "MR\\CT", "ORIGINAL\\PRIMARY", "FOR PRESENTATION", "L"]),
    "IS": st.integers(min_value=0, max_value=99999),
    "UI": st.sampled_from(["1.2.840.10008.5.1.4.1.1.2", "2.25.1", "2.25.12"]),
    "US": st.integers(min_value=0, max_value=65535),
}
CHARSETS = [[], ["ISO_IR 192"], ["ISO_IR 100"], ["ISO 2022 IR 6", "ISO 2022 IR 87"]]
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@st.composite
def requests(draw: st.DrawFn) -> tuple[Dataset, dict[str, Any], str]:
    keys = draw(st.lists(st.sampled_from(KEYWORDS), min_size=1, max_size=8, unique=True))
    identifier = Dataset()
    charset = draw(st.sampled_from(CHARSETS))
    if charset:
        identifier.SpecificCharacterSet = charset if len(charset) > 1 else charset[0]
    identifier.QueryRetrieveLevel = "STUDY"
    row: dict[str, Any] = {}
    for keyword in keys:
        identifier.add_new(keyword, dictionary_VR(keyword), None)
        vr = ATTRIBUTES[keyword].vr
        row[keyword] = draw(st.one_of(st.none(), st.just(""), VALUES[vr]))
    return identifier, row, draw(st.sampled_from(SYNTAXES))


def reference(identifier: Dataset, row: dict[str, Any], syntax: str) -> bytes:
    answer = encode_match(row, identifier, Level.STUDY, "FILMLESS")
    encoded = encode(answer, syntax == ImplicitVRLittleEndian, True, False)
    assert encoded is not None
    return encoded


@settings(max_examples=400, deadline=None)
@given(requests())
def test_direct_encoding_equals_pydicom(request: tuple[Dataset, dict[str, Any], str]) -> None:
    identifier, row, syntax = request
    fast = MatchEncoder(identifier, Level.STUDY, "FILMLESS", syntax).encode(row)
    if fast is not None:
        assert fast == reference(identifier, row, syntax)


ROW = {
    "StudyInstanceUID": "2.25.7",
    "PatientName": "Smith^Anna",
    "StudyDate": "20240301",
    "ModalitiesInStudy": "CT\\MR",
    "NumberOfStudyRelatedInstances": 20,
}


def _study_identifier(charset: str = "") -> Dataset:
    """A study-level query asking for every key of ``ROW``."""
    identifier = Dataset()
    if charset:
        identifier.SpecificCharacterSet = charset
    identifier.QueryRetrieveLevel = "STUDY"
    for keyword in ROW:
        setattr(identifier, keyword, "")
    return identifier


def test_ascii_and_utf8_rows_take_the_direct_path() -> None:
    for syntax in SYNTAXES:
        for charset, name in [("", "Smith^Anna"), ("", "Müller^Jürgen"), ("ISO_IR 192", "山田")]:
            identifier = _study_identifier(charset)
            row = {**ROW, "PatientName": name}
            fast = MatchEncoder(identifier, Level.STUDY, "FILMLESS", syntax).encode(row)
            assert fast is not None
            assert fast == reference(identifier, row, syntax)


def test_other_character_sets_and_syntaxes_fall_back() -> None:
    latin1 = _study_identifier("ISO_IR 100")
    row = {**ROW, "PatientName": "Müller^Jürgen"}
    assert MatchEncoder(latin1, Level.STUDY, "FILMLESS", ExplicitVRLittleEndian).encode(row) is None
    plain = _study_identifier()
    big = MatchEncoder(plain, Level.STUDY, "FILMLESS", ExplicitVRBigEndian)
    assert big.encode(ROW) is None
    with_sequence = _study_identifier()
    with_sequence.RequestAttributesSequence = []
    sequence = MatchEncoder(with_sequence, Level.STUDY, "FILMLESS", ExplicitVRLittleEndian)
    assert sequence.encode(ROW) is None
