"""What QIDO-RS and C-FIND answer, one row per rule, each citing its clause; on SQLite
and on a real PostgreSQL.

The archive holds three studies whose headers carry attributes the index has no column
for (InstitutionName, OtherPatientIDsSequence, RequestAttributesSequence, a private
element): an answer names them as stored, and matching on them filters.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from dicomweb.app import create_app
from pacs.archive import Archive, Origin
from pacs.dimse.reactor import MendedAE
from pacs.dimse.server import DimseConfig, start_dimse
from pacs.index import Index
from pacs.store import FsBlobStore
from tests.conftest import free_port
from tests.support.instances import ct_instance, source
from tests.support.web import serving


@dataclass
class Stored:
    url: str
    dimse: DimseConfig
    studies: dict[str, Dataset]  # "A", "B", "C"


def _study(
    patient_id: str,
    name: str,
    institution: str,
    date: str,
    *,
    other_ids: tuple[str, ...] = (),
    requested: str = "",
) -> Dataset:
    ds = ct_instance(patient_id=patient_id, patient_name=name)
    ds.InstitutionName = institution
    ds.StudyDate = date
    ds.SeriesDescription = f"series of {name}"
    if other_ids:
        items = []
        for other in other_ids:
            item = Dataset()
            item.PatientID, item.IssuerOfPatientID = other, "OTHER"
            items.append(item)
        ds.OtherPatientIDsSequence = items
    if requested:
        item = Dataset()
        item.ScheduledProcedureStepID = f"SPS-{requested}"
        item.RequestedProcedureID = f"RP-{requested}"
        ds.RequestAttributesSequence = [item]
    block = ds.private_block(0x0009, "FILMLESS TEST", create=True)
    block.add_new(0x01, "LO", f"private {patient_id}")
    return ds


@pytest.fixture
def stored(index: Index, tmp_path: Path) -> Iterator[Stored]:
    archive = Archive(FsBlobStore(tmp_path / "data"), index)
    studies = {
        "A": _study(
            "PA", "Smith^Alice", "General Hospital", "20240105", other_ids=("ALT1",), requested="1"
        ),
        "B": _study("PB", "Jones^Bob", "Clinic", ""),
        "C": _study("PC", "Smith^Carol", "General Clinic", "20240301", requested="3"),
    }
    for ds in studies.values():
        archive.ingest(source(ds), Origin.IMPORT)
    config = DimseConfig(port=free_port())
    server = start_dimse(archive, config)
    try:
        with serving(create_app(archive)) as url:
            yield Stored(url, config, studies)
    finally:
        server.shutdown()


def qido(stored: Stored, path: str, **params: str) -> httpx.Response:
    return httpx.get(stored.url + path, params=params)


def study_uids(answer: httpx.Response) -> set[str]:
    assert answer.status_code == 200, answer.text
    return {a["0020000D"]["Value"][0] for a in answer.json()}


def uid(stored: Stored, key: str) -> str:
    return str(stored.studies[key].StudyInstanceUID)


def c_find(stored: Stored, identifier: Dataset) -> list[Dataset]:
    ae = MendedAE(ae_title="WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", stored.dimse.port, ae_title="FILMLESS")
    assert assoc.is_established
    try:
        return [
            a
            for s, a in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
            if s.Status in (0xFF00, 0xFF01) and a is not None
        ]
    finally:
        assoc.release()


def _value(answer: dict[str, Any], tag: str) -> Any:
    return (answer.get(tag, {}).get("Value") or [None])[0]


# -- unindexed attributes --------------------------------------------------------------


def test_includefield_of_an_unindexed_attribute_is_what_was_stored(stored: Stored) -> None:
    """PS3.18 10.6.3.3.1: the other study attributes named in includefield that the
    origin server supports are returned: InstitutionName from the stored header."""
    answers = qido(stored, "/studies", includefield="InstitutionName").json()
    got = {_value(a, "0020000D"): _value(a, "00080080") for a in answers}
    assert got == {
        uid(stored, "A"): "General Hospital",
        uid(stored, "B"): "Clinic",
        uid(stored, "C"): "General Clinic",
    }


def test_matching_on_an_unindexed_attribute_filters(stored: Stored) -> None:
    """PS3.4 C.2.2.2.1 single value and C.2.2.2.4 wild card matching, whatever column
    the index has: InstitutionName=Nobody matches nothing."""
    assert study_uids(qido(stored, "/studies", InstitutionName="Nobody")) == set()
    assert study_uids(qido(stored, "/studies", InstitutionName="Clinic")) == {uid(stored, "B")}
    assert study_uids(qido(stored, "/studies", InstitutionName="General*")) == {
        uid(stored, "A"),
        uid(stored, "C"),
    }
    # With limit and offset applied after that matching (PS3.18 8.3.4.4).
    assert len(qido(stored, "/studies", InstitutionName="General*", limit="1").json()) == 1
    paged = qido(stored, "/studies", InstitutionName="General*", limit="1", offset="1")
    assert study_uids(paged) == {uid(stored, "C")}


def test_a_private_attribute_is_asked_for_by_its_tag(stored: Stored) -> None:
    """PS3.18 8.3.4.1: an attribute is named by keyword or tag; private by tag."""
    answers = qido(stored, "/studies", includefield="00091001", PatientID="PA").json()
    (answer,) = answers
    assert answer["00091001"] == {"vr": "LO", "Value": ["private PA"]}
    # With its Private Creator (PS3.18 10.6.3.3.1).
    assert answer["00090010"] == {"vr": "LO", "Value": ["FILMLESS TEST"]}


def test_c_find_returns_an_unindexed_key_and_matches_a_sequence(stored: Stored) -> None:
    """PS3.4 C.2.2.2.6: an item key of a sequence matches when some stored item matches
    it; the answer holds the matching items with the requested attributes only."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    identifier.InstitutionName = ""
    item = Dataset()
    item.PatientID = "ALT1"
    identifier.OtherPatientIDsSequence = [item]
    (answer,) = c_find(stored, identifier)
    assert answer.StudyInstanceUID == uid(stored, "A")
    assert answer.InstitutionName == "General Hospital"
    (returned,) = answer.OtherPatientIDsSequence
    assert returned.PatientID == "ALT1"
    assert "IssuerOfPatientID" not in returned


def test_c_find_returns_the_request_attributes_sequence(stored: Stored) -> None:
    """The conformance statement promises RequestAttributesSequence at SERIES level
    (PS3.4 C.6.2.1.3 allows it as an optional key); a universal sequence key returns
    the whole stored sequence (C.2.2.2.6)."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = uid(stored, "C")
    identifier.SeriesInstanceUID = ""
    identifier.RequestAttributesSequence = []
    (answer,) = c_find(stored, identifier)
    (item,) = answer.RequestAttributesSequence
    assert (item.ScheduledProcedureStepID, item.RequestedProcedureID) == ("SPS-3", "RP-3")


# -- what each level answers -----------------------------------------------------------


def test_series_across_studies_carry_the_study_attributes(stored: Stored) -> None:
    """PS3.18 10.6.3.3.2: for the All Series resource, the study attributes of table
    10.6.3-3 come with each series."""
    answers = qido(stored, "/series", PatientID="PB").json()
    (answer,) = answers
    assert _value(answer, "00100010") == {"Alphabetic": "Jones^Bob"}
    assert _value(answer, "00080050") == "ACC1"  # AccessionNumber
    assert _value(answer, "0020000D") == uid(stored, "B")


def test_instances_carry_series_and_study_attributes(stored: Stored) -> None:
    """PS3.18 10.6.3.3.3: a study's instances carry the series attributes (Modality,
    SeriesNumber, SeriesDescription); All Instances also the study's."""
    (answer,) = qido(stored, f"/studies/{uid(stored, 'A')}/instances").json()
    assert _value(answer, "00080060") == "CT"
    assert _value(answer, "00200011") == 1
    assert _value(answer, "0008103E") == "series of Smith^Alice"
    assert "00100010" not in answer  # a study's instances: the study is known
    (across,) = qido(stored, "/instances", PatientID="PC").json()
    assert _value(across, "00100010") == {"Alphabetic": "Smith^Carol"}
    assert _value(across, "00080060") == "CT"


def test_lower_level_includefields_are_not_returned(stored: Stored) -> None:
    """PS3.18 10.6.3.3.1: Series or Instance Level attributes in includefield shall not
    be returned (not even empty)."""
    answers = qido(stored, "/studies", includefield="Modality,SOPInstanceUID,Rows").json()
    assert answers
    for answer in answers:
        assert "00080060" not in answer
        assert "00080018" not in answer
        assert "00280010" not in answer


# -- syntax of a QIDO-RS request -------------------------------------------------------


def test_comma_separated_uids_are_a_list(stored: Stored) -> None:
    """PS3.18 8.3.4.1: UID list matching (PS3.4 C.2.2.2.2) with comma-separated UIDs."""
    both = f"{uid(stored, 'A')},{uid(stored, 'C')}"
    answer = qido(stored, "/studies", StudyInstanceUID=both)
    assert study_uids(answer) == {uid(stored, "A"), uid(stored, "C")}


def test_unknown_parameters_are_ignored(stored: Stored) -> None:
    """PS3.18 8.3.4: viewers add cache busters (``_=1712345``); not an error."""
    answer = qido(stored, "/studies", _="1712345", PatientID="PA")
    assert study_uids(answer) == {uid(stored, "A")}


def test_a_limit_that_cuts_the_answer_says_so(stored: Stored) -> None:
    """PS3.18 8.3.4.4.1 and 10.6.3.2: a Warning header when there are more matches."""
    cut = qido(stored, "/studies", limit="2")
    assert len(cut.json()) == 2
    assert cut.headers["warning"].startswith("299 ")
    whole = qido(stored, "/studies", limit="3")
    assert "warning" not in whole.headers


def test_a_study_without_a_date_matches_a_date_range(stored: Stored) -> None:
    """PS3.4 C.2.2.1.2: a Required Key of zero length is unknown and matches."""
    answer = qido(stored, "/studies", StudyDate="20240101-20240131")
    assert study_uids(answer) == {uid(stored, "A"), uid(stored, "B")}


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"StudyDate": "2024*"}, "wildcards are not allowed"),  # PS3.4 C.2.2.2.4
        ({"StudyTime": "12??00"}, "wildcards are not allowed"),
        ({"00020010": "1.2.840.10008.1.2"}, "not a search key"),  # PS3.18 8.3.4.1
        ({"limit": "x"}, "limit must be"),
    ],
)
def test_malformed_keys_are_400(stored: Stored, params: dict[str, str], reason: str) -> None:
    answer = qido(stored, "/studies", **params)
    assert answer.status_code == 400
    assert reason in answer.json()["error"]


def test_person_names_match_without_regard_to_case_by_default(stored: Stored) -> None:
    """PS3.4 C.2.2.2.1 leaves PN case to the implementation; with
    case_insensitive_names (the default, as Orthanc's CaseSensitivePN=false) a viewer's
    filter "smith" finds Smith."""
    assert study_uids(qido(stored, "/studies", PatientName="smith*")) == {
        uid(stored, "A"),
        uid(stored, "C"),
    }
