"""STOW-RS over a real uvicorn server: dicomweb-client for the happy path, httpx for errors."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from dicomweb.app import create_app
from pacs.archive import Archive
from pacs.dimse.reactor import MendedAE
from pacs.dimse.server import DimseConfig, start_dimse
from pacs.index import Index
from tests.conftest import StoreFactory, free_port, make_archive
from tests.support.instances import ct_instance, part10
from tests.support.web import serving

BOUNDARY = "test-boundary-1234"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


EVERY_BLOB_STORE = True


@dataclass
class Stow:
    url: str
    client: DICOMwebClient
    archive: Archive
    index: Index


@pytest.fixture
def stow(tmp_path: Path, blob_stores: StoreFactory) -> Iterator[Stow]:
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    index.create_schema()
    archive = make_archive(tmp_path / "data", index, stores=blob_stores)
    with serving(create_app(archive, max_request_bytes=256 * 1024)) as url:
        yield Stow(url, DICOMwebClient(url), archive, index)
    index.dispose()


def body(*files: bytes) -> bytes:
    out = b""
    for data in files:
        out += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def _items(
    answer: dict[str, dict[str, object]], tag: str
) -> list[dict[str, dict[str, list[object]]]]:
    value = answer[tag].get("Value", [])
    assert isinstance(value, list)
    return value


def _stored_data_set(archive: Archive, SOPInstanceUID: str) -> bytes:
    record = archive.index.instance(SOPInstanceUID)
    assert record is not None
    with archive.open(record) as stream:
        data = stream.read()
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    return data[meta_end:]


def test_store_instances_and_read_them_back(stow: Stow) -> None:
    study = pydicom.uid.generate_uid()
    made = [
        pydicom.dcmread(io.BytesIO(part10(ct_instance(study=study, patient_id="STOW", seed=n))))
        for n in range(3)
    ]
    answer = stow.client.store_instances(made)
    referenced = answer.ReferencedSOPSequence
    assert sorted(item.ReferencedSOPInstanceUID for item in referenced) == sorted(
        ds.SOPInstanceUID for ds in made
    )
    assert answer.RetrieveURL.endswith(f"/studies/{study}")
    assert "FailedSOPSequence" not in answer or len(answer.FailedSOPSequence) == 0
    for ds in made:
        sent = part10(ds)
        meta_end = 132 + 12 + int.from_bytes(sent[140:144], "little")
        assert _stored_data_set(stow.archive, ds.SOPInstanceUID) == sent[meta_end:]
        item = next(i for i in referenced if i.ReferencedSOPInstanceUID == ds.SOPInstanceUID)
        # dicomweb-client sends a Host header without the port, so only the path is ours.
        path = item.RetrieveURL.split("/dicom-web", 1)[1]
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        fetched = httpx.get(stow.url + path, headers={"Accept": accept})
        assert fetched.status_code == 200
    assert len(stow.client.search_for_instances(study)) == 3


def test_status_codes_follow_ps3_18(stow: Stow) -> None:
    study = pydicom.uid.generate_uid()
    ours = ct_instance(study=study, patient_id="MIX")
    other = ct_instance(patient_id="MIX")
    headers = {"Content-Type": MULTIPART}

    mixed = httpx.post(
        f"{stow.url}/studies/{study}", content=body(part10(ours), part10(other)), headers=headers
    )
    assert mixed.status_code == 202
    answer = mixed.json()
    assert [i["00081155"]["Value"][0] for i in _items(answer, "00081199")] == [ours.SOPInstanceUID]
    (failed,) = _items(answer, "00081198")
    assert failed["00081155"]["Value"] == [other.SOPInstanceUID]
    assert failed["00081197"] == {"vr": "US", "Value": [0xA900]}
    assert "belongs to study" in mixed.headers["warning"]
    assert stow.index.instance(other.SOPInstanceUID) is None

    garbage = httpx.post(f"{stow.url}/studies", content=body(b"not dicom at all"), headers=headers)
    assert garbage.status_code == 409
    (failed,) = _items(garbage.json(), "00081198")
    assert failed["00081197"]["Value"] == [0xC000]

    different = ct_instance(sop=ours.SOPInstanceUID, study=study, patient_id="MIX", seed=9)
    duplicate = httpx.post(f"{stow.url}/studies", content=body(part10(different)), headers=headers)
    assert duplicate.status_code == 409
    assert _items(duplicate.json(), "00081198")[0]["00081197"]["Value"] == [0x0111]

    again = httpx.post(f"{stow.url}/studies", content=body(part10(ours)), headers=headers)
    assert again.status_code == 200  # the same bytes again: stored already, not an error


@pytest.mark.parametrize(
    ("content_type", "content", "status"),
    [
        ("application/dicom", b"x", 415),
        ('multipart/related; type="application/dicom+json"; boundary=b', b"x", 415),
        ('multipart/related; type="application/dicom"', b"x", 400),
        (MULTIPART, f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\nabc".encode(), 400),
        (MULTIPART, f"--{BOUNDARY}--\r\n".encode(), 400),
    ],
)
def test_malformed_requests(stow: Stow, content_type: str, content: bytes, status: int) -> None:
    response = httpx.post(
        f"{stow.url}/studies", content=content, headers={"Content-Type": content_type}
    )
    assert response.status_code == status
    assert response.json()["error"]


def test_bodies_over_the_limit_are_413(stow: Stow) -> None:
    big = ct_instance(patient_id="BIG")
    big.Rows = big.Columns = 512
    big.PixelData = bytes(512 * 512 * 2)
    content = body(part10(big))
    declared = httpx.post(
        f"{stow.url}/studies", content=content, headers={"Content-Type": MULTIPART}
    )
    assert declared.status_code == 413

    def chunked() -> Iterator[bytes]:
        for start in range(0, len(content), 65536):
            yield content[start : start + 65536]

    streamed = httpx.post(
        f"{stow.url}/studies", content=chunked(), headers={"Content-Type": MULTIPART}
    )
    assert streamed.status_code == 413
    assert stow.index.instances() == []
    assert list((stow.archive.store.staging).iterdir()) == []


def test_c_store_found_by_qido_and_stow_found_by_c_find(stow: Stow) -> None:
    config = DimseConfig(port=free_port())
    server = start_dimse(stow.archive, config)
    try:
        ae = MendedAE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", config.port, ae_title="FILMLESS")
        by_dimse = ct_instance(patient_id="CROSS-DIMSE")
        assert assoc.send_c_store(by_dimse).Status == 0
        found = stow.client.search_for_studies(search_filters={"PatientID": "CROSS-DIMSE"})
        assert [a["0020000D"]["Value"] for a in found] == [[by_dimse.StudyInstanceUID]]

        by_web = ct_instance(patient_id="CROSS-WEB", patient_name="Web^Stowed")
        stow.client.store_instances([pydicom.dcmread(io.BytesIO(part10(by_web)))])
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = "CROSS-WEB"
        query.PatientName = ""
        query.StudyInstanceUID = ""
        answers: list[Dataset] = [
            identifier
            for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            )
            if status.Status in (0xFF00, 0xFF01) and identifier is not None
        ]
        assoc.release()
    finally:
        server.shutdown()
    assert [a.StudyInstanceUID for a in answers] == [by_web.StudyInstanceUID]
    assert str(answers[0].PatientName) == "Web^Stowed"
