"""Patient identity is per study and never silently merged; the same instance sent again
in another encoding is the same instance.

Study-level answers carry the patient attributes of that study (PS3.4 C.6.2.1.2: in the
Study Root model patient attributes are attributes of the study). PATIENT-level C-FIND
groups by PatientID and its issuer (C.6.1.1.2), never studies without a PatientID. An
instance naming a study of another patient is refused (0xA900, "data set does not match
SOP class", the status PS3.4 B.2.3 has for a data set the SCP will not take as sent).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from dicomweb.app import create_app
from pacs.archive import Archive, Origin
from pacs.audit import AuditTrail
from pacs.dimse.reactor import MendedAE
from pacs.dimse.server import DimseConfig, start_dimse
from pacs.errors import PatientConflict
from pacs.index import Index, PatientPolicy
from pacs.status import StoreStatus
from pacs.store import FsBlobStore
from tests.conftest import free_port
from tests.support.instances import ct_instance, part10, source
from tests.support.scu import associate, send_raw
from tests.support.web import serving

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


@dataclass
class Site:
    archive: Archive
    dimse: DimseConfig
    url: str
    audit: Path


def _site(tmp_path: Path, policy: PatientPolicy = "reject") -> Iterator[Site]:
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    index.create_schema()
    audit = tmp_path / "audit.jsonl"
    archive = Archive(
        FsBlobStore(tmp_path / "data"), index, patient_policy=policy, audit=AuditTrail(audit)
    )
    config = DimseConfig(port=free_port())
    server = start_dimse(archive, config)
    try:
        with serving(create_app(archive)) as url:
            yield Site(archive, config, url, audit)
    finally:
        server.shutdown()
        index.dispose()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield from _site(tmp_path)


def _encoded(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    body = DicomBytesIO()
    body.is_little_endian = True
    body.is_implicit_VR = syntax == ImplicitVRLittleEndian
    write_dataset(body, ds)
    return body.getvalue()


def c_store(
    site: Site, ds: Dataset, data: bytes | None = None, syntax: str = ExplicitVRLittleEndian
) -> Dataset:
    assoc = associate(site.dimse, [(str(ds.SOPClassUID), [syntax])])
    assert assoc.is_established
    try:
        return send_raw(
            assoc,
            context_id=1,
            SOPClassUID=str(ds.SOPClassUID),
            SOPInstanceUID=str(ds.SOPInstanceUID),
            data_set=data if data is not None else _encoded(ds, syntax),
        )
    finally:
        assoc.release()


def stow(site: Site, data: bytes) -> dict[str, object]:
    boundary = "identity-boundary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    answer = httpx.post(
        f"{site.url}/studies",
        content=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        },
    )
    result: dict[str, object] = answer.json()
    return result


def find(
    site: Site, level: str, model: str = StudyRootQueryRetrieveInformationModelFind, **keys: str
) -> list[Dataset]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    ae = MendedAE(ae_title="WORKSTATION")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", site.dimse.port, ae_title="FILMLESS")
    assert assoc.is_established
    try:
        return [
            a
            for s, a in assoc.send_c_find(identifier, model)
            if s.Status in (0xFF00, 0xFF01) and a is not None
        ]
    finally:
        assoc.release()


def _study_names(site: Site, **query: str) -> dict[str, str]:
    answers = httpx.get(f"{site.url}/studies", params=query).json()
    return {
        a["0020000D"]["Value"][0]: (a["00100010"].get("Value") or [{}])[0].get("Alphabetic", "")
        for a in answers
    }


def test_studies_without_patient_id_keep_their_own_names(site: Site) -> None:
    """Anonymised studies all have an empty PatientID: each still shows its own patient,
    by QIDO-RS and C-FIND, and none is grouped with another at PATIENT level."""
    first = ct_instance(patient_id="", patient_name="Anon^First")
    second = ct_instance(patient_id="", patient_name="Anon^Second")
    for ds in (first, second):
        assert c_store(site, ds).Status == 0
    names = _study_names(site)
    assert names == {first.StudyInstanceUID: "Anon^First", second.StudyInstanceUID: "Anon^Second"}
    answers = find(site, "STUDY", PatientName="", StudyInstanceUID="")
    assert {a.StudyInstanceUID: str(a.PatientName) for a in answers} == names
    patients = find(
        site,
        "PATIENT",
        PatientRootQueryRetrieveInformationModelFind,
        PatientID="",
        PatientName="",
        NumberOfPatientRelatedStudies="",
    )
    assert sorted(str(p.PatientName) for p in patients) == ["Anon^First", "Anon^Second"]
    assert all(int(p.NumberOfPatientRelatedStudies) == 1 for p in patients)


def test_a_study_after_a_name_correction_shows_and_is_found_by_the_new_name(site: Site) -> None:
    old = ct_instance(patient_id="P7", patient_name="Smith^Jon")
    new = ct_instance(patient_id="P7", patient_name="Smith^John")
    for ds in (old, new):
        assert c_store(site, ds).Status == 0
    assert _study_names(site) == {
        old.StudyInstanceUID: "Smith^Jon",
        new.StudyInstanceUID: "Smith^John",
    }
    assert list(_study_names(site, PatientName="Smith^John")) == [new.StudyInstanceUID]
    # One patient at PATIENT level (same PatientID), named as its latest instance says.
    (patient,) = find(
        site,
        "PATIENT",
        PatientRootQueryRetrieveInformationModelFind,
        PatientID="P7",
        PatientName="",
        NumberOfPatientRelatedStudies="",
    )
    assert str(patient.PatientName) == "Smith^John"
    assert int(patient.NumberOfPatientRelatedStudies) == 2


def test_an_instance_of_another_patient_is_refused_and_audited(site: Site) -> None:
    stored = ct_instance(patient_id="P1", patient_name="Right^Person")
    assert c_store(site, stored).Status == 0
    other = ct_instance(study=stored.StudyInstanceUID, patient_id="P2", patient_name="Wrong^Person")
    status = c_store(site, other)
    assert status.Status == StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert "another patient" in str(status.ErrorComment)
    # STOW-RS answers the same status as its FailureReason (PS3.18 table 10.5.3-2).
    other.SOPInstanceUID = pydicom.uid.generate_uid()
    answer = stow(site, part10(other))
    (failure,) = answer["00081198"]["Value"]  # type: ignore[index]
    assert failure["00081197"]["Value"] == [StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS]
    assert _study_names(site) == {stored.StudyInstanceUID: "Right^Person"}
    refusals = [
        json.loads(line)
        for line in site.audit.read_text().splitlines()
        if "another patient" in line
    ]
    assert len(refusals) == 2
    assert all(r["EventOutcomeIndicator"] != 0 for r in refusals)


def test_same_id_other_name_and_birth_date_is_another_person(site: Site) -> None:
    stored = ct_instance(patient_id="P1", patient_name="Doe^Jane")
    assert c_store(site, stored).Status == 0
    twin = ct_instance(study=stored.StudyInstanceUID, patient_id="P1", patient_name="Roe^Rick")
    twin.PatientBirthDate = "19991231"
    assert c_store(site, twin).Status == StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    # A corrected name alone (same ID, same birth date) is the same patient.
    corrected = ct_instance(
        study=stored.StudyInstanceUID, patient_id="P1", patient_name="Doe^Jayne"
    )
    assert c_store(site, corrected).Status == 0
    assert _study_names(site) == {stored.StudyInstanceUID: "Doe^Jayne"}


def test_patient_conflict_update_moves_the_study(tmp_path: Path) -> None:
    for site in _site(tmp_path, policy="update"):
        stored = ct_instance(patient_id="P1", patient_name="Right^Person")
        assert c_store(site, stored).Status == 0
        moved = ct_instance(
            study=stored.StudyInstanceUID, patient_id="P2", patient_name="New^Owner"
        )
        assert c_store(site, moved).Status == 0
        assert _study_names(site) == {stored.StudyInstanceUID: "New^Owner"}
        patients = find(
            site,
            "PATIENT",
            PatientRootQueryRetrieveInformationModelFind,
            PatientID="",
            NumberOfPatientRelatedInstances="",
        )
        assert {(str(p.PatientID), int(p.NumberOfPatientRelatedInstances)) for p in patients} == {
            ("P2", 2)
        }


def test_a_series_of_another_study_is_refused(site: Site) -> None:
    stored = ct_instance()
    assert c_store(site, stored).Status == 0
    elsewhere = ct_instance(series=stored.SeriesInstanceUID)
    status = c_store(site, elsewhere)
    assert status.Status == StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert "belongs to another study" in str(status.ErrorComment)


def _group_lengths(ds: Dataset) -> bytes:
    """The data set with a group length element in front of each group (retired, but
    some modalities still write them)."""
    groups: dict[int, Dataset] = {}
    for element in ds:
        groups.setdefault(element.tag.group, Dataset()).add(element)
    out = b""
    for group, members in sorted(groups.items()):
        body = _encoded(members)
        length = group.to_bytes(2, "little") + b"\x00\x00UL\x04\x00"
        out += length + len(body).to_bytes(4, "little") + body
    return out


def test_the_same_instance_in_another_encoding_is_a_duplicate(site: Site) -> None:
    """Implicit instead of explicit VR, with group lengths, an undefined-length sequence,
    the file instead of its data set: Success, not 0x0111 (PS3.4 B.2.3 keeps 0x0111 for
    a different instance under the same UID)."""
    ds = ct_instance()
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D3000", "SRT", "Chest"
    ds.AnatomicRegionSequence = [item]
    assert c_store(site, ds).Status == 0
    stored = site.archive.index.instance(ds.SOPInstanceUID)
    assert stored is not None
    implicit = c_store(site, ds, syntax=ImplicitVRLittleEndian)
    assert implicit.Status == 0
    assert c_store(site, ds, data=_group_lengths(ds)).Status == 0
    undefined = ds.copy()
    undefined["AnatomicRegionSequence"].is_undefined_length = True
    assert c_store(site, undefined).Status == 0
    answer = stow(site, part10(ds))
    assert "00081198" not in answer or not answer["00081198"].get("Value")  # type: ignore[attr-defined]
    # Still the first copy, and one instance.
    again = site.archive.index.instance(ds.SOPInstanceUID)
    assert again is not None
    assert again.sha256 == stored.sha256
    assert len(site.archive.index.instances()) == 1
    # Different content under the same UID is still a duplicate with different content.
    changed = ds.copy()
    changed.PatientComments = "edited"
    assert c_store(site, changed).Status == StoreStatus.DUPLICATE_SOP_INSTANCE


def test_big_and_little_endian_copies_of_one_instance(site: Site) -> None:
    """pydicom's liver_1frame.dcm and liver_expb_1frame.dcm: one instance, two encodings."""
    for name in ("liver_1frame.dcm", "liver_expb_1frame.dcm"):
        outcome = site.archive.ingest_file(TEST_FILES / name, Origin.IMPORT)
        assert outcome.record.SOPInstanceUID
    assert len(site.archive.index.instances()) == 1
    answer = stow(site, (TEST_FILES / "liver_expb_1frame.dcm").read_bytes())
    assert answer["00081199"]["Value"]  # type: ignore[index]
    assert len(site.archive.index.instances()) == 1


def test_import_of_an_instance_of_another_patient_is_refused(site: Site) -> None:
    stored = ct_instance(patient_id="P1")
    site.archive.ingest(source(stored), Origin.IMPORT)
    other = ct_instance(study=stored.StudyInstanceUID, patient_id="P9")
    with pytest.raises(PatientConflict, match="another patient"):
        site.archive.ingest(source(other), Origin.IMPORT)
