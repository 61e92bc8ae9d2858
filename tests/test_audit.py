"""The audit trail: stores, queries, retrieves, deletes and refused logins, over DIMSE
and DICOMweb, each a JSON line with the PS3.15 audit message fields."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from pydicom.dataset import Dataset
from pynetdicom import build_role, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomweb.app import create_app
from dicomweb.audit import classify
from dicomweb.auth import ApiToken, digest
from filmless.cli import import_one
from pacs.archive import Archive, InstanceSource, Origin
from pacs.audit import AuditEvent, AuditTrail
from pacs.dimse.reactor import MendedAE
from pacs.dimse.server import DimseConfig, start_dimse
from tests.conftest import free_port
from tests.support.instances import ct_instance, part10
from tests.support.web import serving

STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=B'


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _event(line: dict[str, Any]) -> tuple[str, str, int]:
    return line["EventID"]["meaning"], line["EventActionCode"], line["EventOutcomeIndicator"]


def test_dimse_store_query_retrieve_and_refusal(archive: Archive, tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    archive.audit = AuditTrail(trail)
    config = DimseConfig(port=free_port(), allowed_calling_aets=("MODALITY",))
    server = start_dimse(archive, config)
    try:
        ds = ct_instance(patient_id="AUDIT1")
        ae = MendedAE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", config.port, ae_title="FILMLESS")
        assert assoc.send_c_store(ds).Status == 0
        changed = ct_instance(patient_id="AUDIT1", sop=ds.SOPInstanceUID, seed=5)
        assert assoc.send_c_store(changed).Status == 0x0111  # duplicate, refused
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ds.StudyInstanceUID
        assert [
            s.Status
            for s, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
        ][-1] == 0
        assoc.release()
        stranger = MendedAE(ae_title="STRANGER")
        stranger.add_requested_context(CTImageStorage)
        assert not stranger.associate("127.0.0.1", config.port, ae_title="FILMLESS").is_established
    finally:
        server.shutdown()
    lines = _lines(trail)
    assert [_event(line) for line in lines] == [
        ("DICOM Instances Transferred", "C", 0),
        ("DICOM Instances Transferred", "C", 4),
        ("Query", "E", 0),
        ("User Authentication", "E", 4),
    ]
    stored = lines[0]
    assert stored["ActiveParticipant"]["UserID"] == "MODALITY"
    assert stored["ActiveParticipant"]["NetworkAccessPointID"] == "127.0.0.1"
    assert stored["ParticipantObject"]["StudyInstanceUID"] == ds.StudyInstanceUID
    assert "duplicate" in lines[1]["Detail"].lower()
    assert lines[3]["ActiveParticipant"]["UserID"] == "STRANGER"


def test_dicomweb_requests_and_refusals(archive: Archive, tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    archive.audit = AuditTrail(trail)
    ds = ct_instance(patient_id="AUDIT2")
    tokens = [ApiToken("workstation", "admin", digest("secret"))]
    body = b"--B\r\nContent-Type: application/dicom\r\n\r\n"
    body += part10(ds) + b"\r\n--B--\r\n"
    auth = {"Authorization": "Bearer secret"}
    with serving(create_app(archive, api_tokens=tokens)) as url:
        assert httpx.get(f"{url}/studies").status_code == 401
        stowed = httpx.post(
            f"{url}/studies",
            content=body,
            headers={
                **auth,
                "Content-Type": 'multipart/related; type="application/dicom"; boundary=B',
            },
        )
        assert stowed.status_code == 200
        assert httpx.get(f"{url}/studies", headers=auth).status_code == 200
        study = f"{url}/studies/{ds.StudyInstanceUID}"
        assert httpx.get(f"{study}/metadata", headers=auth).status_code == 200
        assert httpx.delete(study, headers=auth).status_code == 204
    lines = _lines(trail)
    assert [_event(line) for line in lines] == [
        ("User Authentication", "E", 4),
        ("DICOM Instances Transferred", "C", 0),  # the instance, with its study
        ("DICOM Instances Transferred", "C", 0),  # the request
        ("Query", "E", 0),
        ("DICOM Instances Transferred", "R", 0),
        ("DICOM Study Deleted", "D", 0),
    ]
    assert lines[0]["ActiveParticipant"]["UserID"] == "anonymous"
    assert {line["ActiveParticipant"]["UserID"] for line in lines[1:]} == {"workstation"}
    assert lines[1]["ParticipantObject"]["StudyInstanceUID"] == ds.StudyInstanceUID
    assert lines[5]["ParticipantObject"]["StudyInstanceUID"] == ds.StudyInstanceUID


def test_search_paths_are_queries_and_others_retrieves() -> None:
    assert classify("GET", "/studies") == AuditEvent.QUERY
    assert classify("GET", "/studies/1.2/series/3.4/instances") == AuditEvent.QUERY
    assert classify("GET", "/studies/1.2/series/3.4/instances/5.6") == AuditEvent.RETRIEVE
    assert classify("GET", "/studies/1.2/metadata") == AuditEvent.RETRIEVE
    assert classify("POST", "/studies/1.2") == AuditEvent.STORE
    assert classify("DELETE", "/studies/1.2") == AuditEvent.DELETE


def test_dimse_retrieves(archive: Archive, tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    archive.audit = AuditTrail(trail)
    ds = ct_instance(patient_id="AUDIT3")
    archive.ingest(InstanceSource.from_part10(io.BytesIO(part10(ds))), Origin.IMPORT)
    config = DimseConfig(port=free_port())
    server = start_dimse(archive, config)
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(cast(C_STORE, event.request).AffectedSOPInstanceUID))
        return 0x0000

    try:
        ae = MendedAE(ae_title="READER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate(
            "127.0.0.1",
            config.port,
            ae_title="FILMLESS",
            ext_neg=[build_role(CTImageStorage, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ds.StudyInstanceUID
        statuses = [
            s.Status for s, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
        ]
        assert statuses[-1] == 0
        bad = Dataset()
        bad.QueryRetrieveLevel = "STUDY"
        bad.StudyInstanceUID = "not a uid"
        statuses = [
            s.Status for s, _ in assoc.send_c_get(bad, StudyRootQueryRetrieveInformationModelGet)
        ]
        assert statuses[-1] != 0
        assoc.release()
    finally:
        server.shutdown()
    assert received == [ds.SOPInstanceUID]
    lines = _lines(trail)
    assert [_event(line) for line in lines] == [
        ("DICOM Instances Transferred", "R", 0),
        ("DICOM Instances Transferred", "R", 4),
    ]
    assert lines[0]["ActiveParticipant"]["UserID"] == "READER"
    assert lines[0]["ParticipantObject"]["StudyInstanceUID"] == ds.StudyInstanceUID
    assert lines[0]["Detail"] == "C-GET: 1 instance(s)"


# pynetdicom drops the socket of a destination it could not connect to without closing
# it; CPython closes it at once (refcount), with a ResourceWarning this test ignores.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_every_kind_of_access_names_who_and_the_real_outcome(
    archive: Archive, tmp_path: Path
) -> None:
    """PS3.15 A.5: who, from where, which study and the real outcome, for what the other
    tests here leave out: a refusal for lack of scope names the token, an import is
    audited, a C-MOVE to an unknown or unreachable destination is a failure."""
    trail = tmp_path / "audit.jsonl"
    archive.audit = AuditTrail(trail)
    ds = ct_instance(patient_id="AUDIT4")
    # filmless import (the operator's account on this host).
    imported = import_one(archive, _written(ds, tmp_path / "ct.dcm"))
    assert imported.refused is None
    # A token that may read but not delete.
    tokens = [ApiToken("viewer", "read", digest("read-only"))]
    with serving(create_app(archive, api_tokens=tokens)) as url:
        refused = httpx.delete(
            f"{url}/studies/{ds.StudyInstanceUID}",
            headers={"Authorization": "Bearer read-only"},
        )
        assert refused.status_code == 403
    # C-MOVE to a destination nobody configured, and to one that does not answer.
    silent = free_port()
    config = DimseConfig(port=free_port(), move_destinations=(("GONE", "127.0.0.1", silent),))
    server = start_dimse(archive, config)
    try:
        ae = MendedAE(ae_title="MOVER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", config.port, ae_title="FILMLESS")
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ds.StudyInstanceUID
        for destination in ("NOWHERE", "GONE"):
            statuses = [
                s.Status
                for s, _ in assoc.send_c_move(
                    query, destination, StudyRootQueryRetrieveInformationModelMove
                )
            ]
            assert statuses[-1] != 0
        assoc.release()
    finally:
        server.shutdown()
    lines = _lines(trail)
    stored, forbidden, unknown, unreachable = lines
    assert stored["ActiveParticipant"]["Protocol"] == "filmless import"
    assert stored["ParticipantObject"]["StudyInstanceUID"] == ds.StudyInstanceUID
    assert forbidden["ActiveParticipant"]["UserID"] == "viewer"
    assert forbidden["EventOutcomeIndicator"] == 4
    assert "unknown destination 'NOWHERE'" in unknown["Detail"]
    assert unknown["EventOutcomeIndicator"] == 4
    assert "GONE" in unreachable["Detail"]
    assert "did not complete" in unreachable["Detail"]
    assert unreachable["EventOutcomeIndicator"] == 4


def _written(ds: Dataset, path: Path) -> Path:
    path.write_bytes(part10(ds))
    return path
