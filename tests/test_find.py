"""C-FIND over loopback: dcmtk findscu and pynetdicom SCUs against the stored corpus."""

from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from pacs.archive import Archive, Origin
from pacs.dimse.find import answers
from pacs.dimse.pending import find_response_command, pdus
from pacs.dimse.reactor import MendedAE
from pacs.dimse.server import DimseConfig, start_dimse
from pacs.index import Index
from pacs.query import Level, Model, Query, execute
from pacs.status import QueryStatus
from tests.conftest import free_port, make_archive
from tests.support.instances import ct_instance, source


@dataclass
class Stored:
    """What the test stored, to check every answer against."""

    studies: dict[str, Dataset] = field(default_factory=dict)
    series: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    instances: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    patients: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))


@dataclass
class Server:
    config: DimseConfig
    stored: Stored
    archive: Archive


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, corpus: list[Path]) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("find")
    index = Index(f"sqlite:///{root / 'index.sqlite'}")
    index.create_schema()
    archive: Archive = make_archive(root / "data", index)
    stored = Stored()
    for path in corpus:
        archive.ingest_file(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stored.studies.setdefault(ds.StudyInstanceUID, ds)
        stored.series[ds.StudyInstanceUID].add(ds.SeriesInstanceUID)
        stored.instances[ds.SeriesInstanceUID].add(ds.SOPInstanceUID)
        stored.patients[ds.PatientID].add(ds.StudyInstanceUID)
    japanese = ct_instance(patient_id="JP1", patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう")
    japanese.SpecificCharacterSet = ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    archive.ingest(source(japanese), Origin.IMPORT)
    config = DimseConfig(port=free_port(), max_find_matches=500)
    running = start_dimse(archive, config)
    try:
        yield Server(config, stored, archive)
    finally:
        running.shutdown()
        index.dispose()


def find(
    server: Server,
    identifier: Dataset,
    model: str = StudyRootQueryRetrieveInformationModelFind,
    *,
    max_pdu: int = 16382,
) -> tuple[list[Dataset], Dataset]:
    ae = MendedAE(ae_title="WORKSTATION")
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", server.config.port, ae_title="FILMLESS")
    assert assoc.is_established
    matches: list[Dataset] = []
    final = Dataset()
    for status, answer in assoc.send_c_find(identifier, model):
        if status.Status in (0xFF00, 0xFF01):
            assert answer is not None
            matches.append(answer)
        else:
            final = status
    assoc.release()
    return matches, final


def study_query(**keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def test_study_level_returns_exactly_the_requested_keys(server: Server) -> None:
    matches, final = find(server, study_query(PatientName="", NumberOfStudyRelatedInstances=""))
    assert final.Status == 0x0000
    assert len(matches) == len(server.stored.studies) + 1
    for answer in matches:
        assert set(answer.dir()) <= {
            "QueryRetrieveLevel",
            "SpecificCharacterSet",
            "RetrieveAETitle",
            "StudyInstanceUID",
            "PatientName",
            "NumberOfStudyRelatedInstances",
        }
        assert answer.RetrieveAETitle == "FILMLESS"
        uid = answer.StudyInstanceUID
        if uid in server.stored.studies:
            expected = sum(len(server.stored.instances[s]) for s in server.stored.series[uid])
            assert int(answer.NumberOfStudyRelatedInstances) == expected
            assert str(answer.PatientName) == str(server.stored.studies[uid].PatientName)


def test_answers_are_cut_to_the_peers_maximum_pdu_length(server: Server) -> None:
    """A requester that takes 128-byte PDUs still gets every key of every match, and one
    that sets no limit gets answers smaller than their command sets."""
    query = study_query(PatientName="", StudyDescription="", NumberOfStudyRelatedInstances="")
    whole, _ = find(server, query)
    cut, final = find(server, query, max_pdu=128)
    assert final.Status == 0x0000
    assert [a.to_json_dict() for a in cut] == [a.to_json_dict() for a in whole]
    unlimited, final = find(server, study_query(), max_pdu=0)  # small answers, no limit
    assert final.Status == 0x0000
    assert len(unlimited) == len(whole)
    assert len(cut) == len(server.stored.studies) + 1


def test_pdus_respect_the_maximum_length() -> None:
    command = find_response_command("1.2.840.10008.5.1.4.1.2.2.1", 7, 0xFF00)
    data = bytes(range(256)) * 3
    for limit in (0, 128, 200, 16382):
        grouped = pdus(1, command, data, limit)
        items = [item for pdu in grouped for item in pdu]
        assert items[0] == (1, b"\x03" + command)
        fragments = items[1:]
        assert b"".join(f[1][1:] for f in fragments) == data
        assert [f[1][0] for f in fragments] == [0] * (len(fragments) - 1) + [2]
        for pdu in grouped:
            assert not limit or sum(6 + len(d) - 1 for _cid, d in pdu) <= limit
    assert len(pdus(1, command, data, 0)) == 1
    # No limit: a data set shorter than the command still makes one PDU.
    assert pdus(1, command, b"\x08\x00\x52\x00", 0) == [
        [(1, b"\x03" + command), (1, b"\x02\x08\x00\x52\x00")]
    ]
    with pytest.raises(ValueError, match="maximum PDU length"):
        pdus(1, command, data, 64)


def test_patient_root_patient_level(server: Server) -> None:
    query = Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    query.PatientID = "FL*"
    query.NumberOfPatientRelatedStudies = ""
    matches, final = find(server, query, PatientRootQueryRetrieveInformationModelFind)
    assert final.Status == 0
    assert {m.PatientID: int(m.NumberOfPatientRelatedStudies) for m in matches} == {
        pid: len(studies) for pid, studies in server.stored.patients.items()
    }


def test_series_and_image_levels(server: Server) -> None:
    study_uid = next(iter(server.stored.studies))
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    query.NumberOfSeriesRelatedInstances = ""
    matches, _ = find(server, query)
    assert {m.SeriesInstanceUID for m in matches} == server.stored.series[study_uid]
    for m in matches:
        assert m.StudyInstanceUID == study_uid
        assert int(m.NumberOfSeriesRelatedInstances) == len(
            server.stored.instances[m.SeriesInstanceUID]
        )
        image = Dataset()
        image.QueryRetrieveLevel = "IMAGE"
        image.StudyInstanceUID = study_uid
        image.SeriesInstanceUID = m.SeriesInstanceUID
        image.SOPInstanceUID = ""
        image.InstanceNumber = ""
        images, final = find(server, image)
        assert final.Status == 0
        assert {i.SOPInstanceUID for i in images} == server.stored.instances[m.SeriesInstanceUID]


def test_non_ascii_names_utf8_and_iso2022(server: Server) -> None:
    query = study_query(PatientName="Müller*", SpecificCharacterSet="ISO_IR 192")
    matches, _ = find(server, query)
    expected = {
        u for u, ds in server.stored.studies.items() if str(ds.PatientName).startswith("Müller")
    }
    assert {m.StudyInstanceUID for m in matches} == expected
    assert all(str(m.PatientName) == "Müller^Jürgen" for m in matches)

    query = study_query(PatientName="*山田*", PatientID="")
    query.SpecificCharacterSet = ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    matches, _ = find(server, query)
    expected = {u for u, ds in server.stored.studies.items() if "山田" in str(ds.PatientName)}
    assert {m.StudyInstanceUID for m in matches if m.PatientID != "JP1"} == expected
    (japanese,) = [m for m in matches if m.PatientID == "JP1"]
    # The answer comes back in the requester's ISO 2022 character set, decoded correctly.
    assert list(japanese.SpecificCharacterSet) == ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    assert japanese.PatientName.ideographic == "山田^太郎"
    assert japanese.PatientName.phonetic == "やまだ^たろう"


@pytest.mark.parametrize(
    ("identifier", "status", "comment"),
    [
        (
            {"QueryRetrieveLevel": "EVERYTHING"},
            QueryStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
            "QueryRetrieveLevel",
        ),
        (
            {"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": ""},
            QueryStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
            "StudyInstanceUID",
        ),
        (
            {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.x"},
            QueryStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
            "not a UID",
        ),
        (
            {
                "QueryRetrieveLevel": "IMAGE",
                "StudyInstanceUID": "1.2",
                "SeriesInstanceUID": "1.2.3",
                "SOPInstanceUID": "",
            },
            0x0000,
            "",
        ),
    ],
)
def test_bad_identifiers_get_a_status_with_a_reason(
    server: Server, identifier: dict[str, str], status: int, comment: str
) -> None:
    query = Dataset()
    for keyword, value in identifier.items():
        setattr(query, keyword, value)
    matches, final = find(server, query)
    assert final.Status == status
    assert matches == []
    if comment:
        assert comment in final.ErrorComment


def test_too_many_matches_is_refused_before_any_answer(server: Server) -> None:
    limited = Server(
        DimseConfig(port=free_port(), max_find_matches=3), server.stored, server.archive
    )
    running = start_dimse(server.archive, limited.config)
    try:
        matches, final = find(limited, study_query())
    finally:
        running.shutdown()
    assert final.Status == QueryStatus.OUT_OF_RESOURCES
    assert "more than 3 matches" in final.ErrorComment
    assert matches == []


@pytest.mark.parametrize("spare", [-1, 0])
def test_the_limit_holds_past_the_matches_read_before_answering(
    server: Server, monkeypatch: pytest.MonkeyPatch, spare: int
) -> None:
    """With more matches than are read ahead, the server counts them before the first
    answer: one over max_find_matches is refused with none sent (PS3.4 C.4.1.1.4,
    0xA700), exactly max_find_matches are all answered."""
    monkeypatch.setattr("pacs.dimse.find._PEEK", 2)
    studies = len(server.stored.studies) + 1  # and the Japanese study
    limit = studies + spare
    limited = Server(
        DimseConfig(port=free_port(), max_find_matches=limit), server.stored, server.archive
    )
    running = start_dimse(server.archive, limited.config)
    try:
        matches, final = find(limited, study_query())
    finally:
        running.shutdown()
    if spare < 0:
        assert final.Status == QueryStatus.OUT_OF_RESOURCES
        assert f"more than {limit} matches" in final.ErrorComment
        assert matches == []
    else:
        assert final.Status == QueryStatus.SUCCESS
        assert len(matches) == studies


def test_too_many_return_keys_are_refused_with_the_limit(server: Server) -> None:
    """A C-FIND naming more keys than max_query_keys costs no search: 0xA700 (PS3.4
    C.4.1.1.4, Refused: Out of Resources) with the limit named."""
    query = study_query()
    for element in range(0x1000, 0x1000 + 300):  # 300 return keys, all empty
        query.add_new(0x00180000 | element, "LO", "")
    matches, final = find(server, query)
    assert final.Status == QueryStatus.OUT_OF_RESOURCES
    assert "at most 256 (max_query_keys)" in final.ErrorComment
    assert matches == []


class _CancellingEvent:
    """Stands in for pynetdicom's event: a C-CANCEL arrives after the first answer."""

    def __init__(self, identifier: Dataset) -> None:
        self.identifier = identifier
        self.request = SimpleNamespace(
            AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelFind
        )
        self.context = SimpleNamespace(transfer_syntax=ExplicitVRLittleEndian)
        self.assoc = SimpleNamespace(
            requestor=SimpleNamespace(
                sop_class_extended={}, ae_title="FINDSCU", address="127.0.0.1"
            )
        )
        self.answers = 0

    @property
    def is_cancelled(self) -> bool:
        return self.answers >= 1


def test_cancel_stops_the_answers(server: Server) -> None:
    event = _CancellingEvent(study_query())
    statuses = []
    responses = answers(
        server.archive,
        event.identifier,
        Model.STUDY_ROOT,
        sop_class=str(event.request.AffectedSOPClassUID),
        extended=b"",
        transfer_syntax=str(event.context.transfer_syntax),
        cancelled=lambda: event.is_cancelled,
        max_matches=1000,
        retrieve_ae="FILMLESS",
    )
    for status, _answer in responses:
        statuses.append(int(status) if isinstance(status, int) else status.Status)
        event.answers += 1
    assert statuses == [QueryStatus.PENDING, QueryStatus.CANCEL]


FINDSCU = shutil.which("findscu")


def findscu(server: Server, tmp_path: Path, *args: str, root: str = "-S") -> list[Dataset]:
    out = tmp_path / f"rsp-{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    run = subprocess.run(
        [
            "findscu",
            root,
            "-aec",
            "FILMLESS",
            "-X",
            "-od",
            str(out),
            *args,
            "127.0.0.1",
            str(server.config.port),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return [pydicom.dcmread(p) for p in sorted(out.iterdir())]


@pytest.mark.dcmtk
@pytest.mark.skipif(FINDSCU is None, reason="dcmtk is not installed")
def test_findscu(server: Server, tmp_path: Path) -> None:
    stored = server.stored
    every = findscu(server, tmp_path, "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID")
    assert {d.StudyInstanceUID for d in every} == set(stored.studies) | {
        d.StudyInstanceUID for d in every if d.StudyInstanceUID not in stored.studies
    }
    assert len(every) == len(stored.studies) + 1

    wildcard = findscu(
        server,
        tmp_path,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID",
        "-k",
        "PatientName=Smith*",
    )
    assert {d.StudyInstanceUID for d in wildcard} == {
        u for u, ds in stored.studies.items() if str(ds.PatientName).startswith("Smith")
    }

    dates = sorted({ds.StudyDate for ds in stored.studies.values()})
    low, high = dates[1], dates[3]
    ranged = findscu(
        server,
        tmp_path,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID",
        "-k",
        f"StudyDate={low}-{high}",
    )
    assert {d.StudyInstanceUID for d in ranged} == {
        u for u, ds in stored.studies.items() if low <= ds.StudyDate <= high
    }

    two = sorted(stored.studies)[:2]
    listed = findscu(
        server,
        tmp_path,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={two[0]}\\{two[1]}",
    )
    assert sorted(d.StudyInstanceUID for d in listed) == two

    modality = findscu(
        server,
        tmp_path,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID",
        "-k",
        "ModalitiesInStudy=MG",
    )
    assert {d.StudyInstanceUID for d in modality} == {
        u for u, ds in stored.studies.items() if ds.Modality == "MG"
    }

    patients = findscu(
        server,
        tmp_path,
        "-k",
        "QueryRetrieveLevel=PATIENT",
        "-k",
        "PatientID",
        "-k",
        "PatientName",
        root="-P",
    )
    assert {d.PatientID for d in patients} == set(stored.patients) | {"JP1"}

    study_uid = two[0]
    series = findscu(
        server,
        tmp_path,
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={study_uid}",
        "-k",
        "SeriesInstanceUID",
        "-k",
        "Modality",
    )
    assert {d.SeriesInstanceUID for d in series} == stored.series[study_uid]
    series_uid = next(iter(stored.series[study_uid]))
    images = findscu(
        server,
        tmp_path,
        "-k",
        "QueryRetrieveLevel=IMAGE",
        "-k",
        f"StudyInstanceUID={study_uid}",
        "-k",
        f"SeriesInstanceUID={series_uid}",
        "-k",
        "SOPInstanceUID",
    )
    assert {d.SOPInstanceUID for d in images} == stored.instances[series_uid]

    utf8 = findscu(
        server,
        tmp_path,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID",
        "-k",
        "SpecificCharacterSet=ISO_IR 192",
        "-k",
        "PatientName=Garçon*",
    )
    assert utf8
    assert all(str(d.PatientName) == "Garçon^Amélie" for d in utf8)


def _find_negotiated(server: Server, identifier: Dataset, app_info: bytes) -> list[Dataset]:
    ae = MendedAE(ae_title="WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    negotiation = SOPClassExtendedNegotiation()
    negotiation.sop_class_uid = StudyRootQueryRetrieveInformationModelFind
    negotiation.service_class_application_information = app_info
    assoc = ae.associate(
        "127.0.0.1", server.config.port, ae_title="FILMLESS", ext_neg=[negotiation]
    )
    assert assoc.is_established
    accepted = assoc.acceptor.sop_class_extended[StudyRootQueryRetrieveInformationModelFind]
    assert accepted[0] == 0  # relational queries declined
    answers = [
        answer
        for status, answer in assoc.send_c_find(
            identifier, StudyRootQueryRetrieveInformationModelFind
        )
        if status.Status == QueryStatus.PENDING and answer is not None
    ]
    assoc.release()
    return answers


def test_person_names_match_without_case_and_accents(server: Server) -> None:
    """With ``case_insensitive_names`` (the default, as Orthanc's CaseSensitivePN=false)
    a name key matches as PS3.4 C.2.2.2.1 allows for PN, whether or not fuzzy semantic
    matching (C.5.1.1) was negotiated; without the setting only fuzzy matching does."""
    expected = {
        u for u, ds in server.stored.studies.items() if str(ds.PatientName).startswith("Müller")
    }
    assert expected
    for fuzzy in (b"\x00\x00\x00", b"\x00\x00\x01"):
        answers = _find_negotiated(server, study_query(PatientName="muller*"), fuzzy)
        assert {m.StudyInstanceUID for m in answers} == expected
    strict = Query(level=Level.STUDY, keys={"PatientName": "muller*"})
    with server.archive.index.reading() as conn:
        assert list(execute(conn, strict)) == []
        fuzzy_query = Query(level=Level.STUDY, keys={"PatientName": "muller*"}, fuzzy=True)
        assert {r["StudyInstanceUID"] for r in execute(conn, fuzzy_query)} == expected
