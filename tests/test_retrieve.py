"""C-MOVE and C-GET over loopback: movescu/getscu and pynetdicom, every byte checked."""

from __future__ import annotations

import io
import shutil
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_role, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacs.archive import Archive, Origin
from pacs.dimse.reactor import MendedAE
from pacs.dimse.server import STORAGE_SOP_CLASSES, DimseConfig, start_dimse
from pacs.index import Index, InstanceRecord
from pacs.part10 import read_file_meta
from pacs.status import QueryStatus
from tests.conftest import StoreFactory, free_port, make_archive
from tests.support.instances import ct_instance, source

EVERY_BLOB_STORE = True


@dataclass
class Destination:
    """A Storage SCP on loopback that keeps what it receives and can refuse one UID."""

    port: int
    received: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    refuse: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, event: evt.Event) -> int:
        uid, syntax, body = _received(event)
        if uid in self.refuse:
            return 0xA700
        with self.lock:
            self.received[uid] = (syntax, body)
        return 0x0000


def _received(event: evt.Event) -> tuple[str, str, bytes]:
    """SOP Instance UID, transfer syntax and data set bytes of an incoming C-STORE."""
    request = cast(C_STORE, event.request)
    uid, syntax = str(request.AffectedSOPInstanceUID), str(event.context.transfer_syntax)
    path = getattr(request, "_dataset_path", None)
    if path is None:  # pynetdicom's chunked receive is off in this process
        return uid, syntax, cast(io.BytesIO, request.DataSet).getvalue()
    with open(path, "rb") as stream:
        read_file_meta(stream)
        return uid, syntax, stream.read()


@dataclass
class Setup:
    archive: Archive
    config: DimseConfig
    destination: Destination


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory, corpus: list[Path], blob_stores: StoreFactory
) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("retrieve")
    index = Index(f"sqlite:///{root / 'index.sqlite'}")
    index.create_schema()
    archive = make_archive(root / "data", index, stores=blob_stores)
    for path in corpus:
        archive.ingest_file(path)
    implicit = ct_instance(study="1.2.826.9.1", series="1.2.826.9.1.1", sop="1.2.826.9.1.1.1")
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    archive.ingest(source(implicit), Origin.IMPORT)

    destination = Destination(port=free_port())
    scp = MendedAE(ae_title="DEST")
    for uid in STORAGE_SOP_CLASSES:
        scp.add_supported_context(
            uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, *_compressed()]
        )
    listening = scp.start_server(
        ("127.0.0.1", destination.port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, destination.handle)],
    )
    config = DimseConfig(
        port=free_port(), move_destinations=(("DEST", "127.0.0.1", destination.port),)
    )
    running = start_dimse(archive, config)
    try:
        yield Setup(archive, config, destination)
    finally:
        running.shutdown()
        assert listening is not None
        listening.shutdown()
        index.dispose()


def _compressed() -> list[str]:
    return [
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.5",
    ]


def _stored_body(archive: Archive, record: InstanceRecord) -> bytes:
    with archive.open(record) as stream:
        read_file_meta(stream)
        return stream.read()


def _records(archive: Archive, study_uid: str) -> list[InstanceRecord]:
    return [r for r in archive.index.instances() if r.StudyInstanceUID == study_uid]


def _move(setup: Setup, identifier: Dataset, destination: str = "DEST") -> list[Dataset]:
    return [status for status, _ in _move_with_identifiers(setup, identifier, destination)]


def _move_with_identifiers(
    setup: Setup, identifier: Dataset, destination: str = "DEST"
) -> list[tuple[Dataset, Dataset | None]]:
    ae = MendedAE(ae_title="WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", setup.config.port, ae_title="FILMLESS")
    assert assoc.is_established
    responses = list(
        assoc.send_c_move(identifier, destination, StudyRootQueryRetrieveInformationModelMove)
    )
    assoc.release()
    return responses


def _study(uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = uid
    return ds


def _a_study_with(archive: Archive, modality_syntax: str | None = None) -> str:
    for record in archive.index.instances():
        if modality_syntax is None or record.TransferSyntaxUID == modality_syntax:
            return record.StudyInstanceUID
    raise LookupError(modality_syntax)


def test_move_study_sends_every_instance_as_stored(setup: Setup) -> None:
    study_uid = _a_study_with(setup.archive, "1.2.840.10008.1.2.4.90")
    expected = _records(setup.archive, study_uid)
    responses = _move(setup, _study(study_uid))
    final = responses[-1]
    assert final.Status == 0x0000
    assert final.NumberOfCompletedSuboperations == len(expected)
    pending = [r for r in responses if r.Status == QueryStatus.PENDING]
    assert [r.NumberOfRemainingSuboperations for r in pending] == list(
        range(len(expected) - 1, -1, -1)
    )[: len(pending)]
    for record in expected:
        syntax, body = setup.destination.received[record.SOPInstanceUID]
        assert syntax == record.TransferSyntaxUID
        assert pydicom.dcmread(io.BytesIO(body), force=True).SOPInstanceUID == record.SOPInstanceUID
        sent = pydicom.dcmread(io.BytesIO(body), force=True)
        sent.file_meta = pydicom.dataset.FileMetaDataset()
        sent.file_meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
        with setup.archive.open(record) as stream:
            stored = pydicom.dcmread(stream)
        assert sent.PixelData == stored.PixelData


def test_move_series_and_image_levels(setup: Setup) -> None:
    record = setup.archive.index.instances()[5]
    series = Dataset()
    series.QueryRetrieveLevel = "SERIES"
    series.StudyInstanceUID = record.StudyInstanceUID
    series.SeriesInstanceUID = record.SeriesInstanceUID
    in_series = [
        r
        for r in setup.archive.index.instances()
        if r.SeriesInstanceUID == record.SeriesInstanceUID
    ]
    assert _move(setup, series)[-1].NumberOfCompletedSuboperations == len(in_series)
    image = Dataset()
    image.QueryRetrieveLevel = "IMAGE"
    image.StudyInstanceUID = record.StudyInstanceUID
    image.SeriesInstanceUID = record.SeriesInstanceUID
    image.SOPInstanceUID = record.SOPInstanceUID
    final = _move(setup, image)[-1]
    assert final.Status == 0
    assert final.NumberOfCompletedSuboperations == 1


def test_move_failures_are_reported(setup: Setup) -> None:
    study_uid = _a_study_with(setup.archive, "1.2.840.10008.1.2.1")
    records = _records(setup.archive, study_uid)
    refused = records[0].SOPInstanceUID
    setup.destination.refuse.add(refused)
    try:
        final, answer = _move_with_identifiers(setup, _study(study_uid))[-1]
    finally:
        setup.destination.refuse.clear()
    assert final.Status == QueryStatus.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
    assert final.NumberOfFailedSuboperations == 1
    assert answer is not None
    assert answer.FailedSOPInstanceUIDList == refused
    assert final.NumberOfCompletedSuboperations == len(records) - 1


def test_move_to_unknown_destination(setup: Setup) -> None:
    final = _move(setup, _study(_a_study_with(setup.archive)), destination="NOWHERE")[-1]
    assert final.Status == QueryStatus.MOVE_DESTINATION_UNKNOWN


def test_move_without_the_unique_key(setup: Setup) -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    final = _move(setup, identifier)[-1]
    assert final.Status == QueryStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert "StudyInstanceUID is required" in final.ErrorComment


def _get(
    setup: Setup, identifier: Dataset, syntaxes: Mapping[str, Sequence[str]]
) -> tuple[Dataset, Dataset | None, dict[str, tuple[str, bytes]]]:
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: evt.Event) -> int:
        uid, syntax, body = _received(event)
        received[uid] = (syntax, body)
        return 0

    ae = MendedAE(ae_title="VIEWER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles: list[Any] = []
    for sop_class, proposed in syntaxes.items():
        ae.add_requested_context(sop_class, list(proposed))
        roles.append(build_role(sop_class, scp_role=True))
    assoc = ae.associate(
        "127.0.0.1",
        setup.config.port,
        ae_title="FILMLESS",
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    final, answer = Dataset(), None
    for status, identifier_answer in assoc.send_c_get(
        identifier, StudyRootQueryRetrieveInformationModelGet
    ):
        final, answer = status, identifier_answer
    assoc.release()
    return final, answer, received


def test_get_transcodes_uncompressed_and_refuses_compressed(setup: Setup) -> None:
    # Stored Implicit VR, asked for Explicit VR only: re-encoded, same data set.
    final, _, received = _get(
        setup, _study("1.2.826.9.1"), {CTImageStorage: [ExplicitVRLittleEndian]}
    )
    assert final.Status == 0
    syntax, body = received["1.2.826.9.1.1.1"]
    assert syntax == ExplicitVRLittleEndian
    sent = pydicom.dcmread(io.BytesIO(body), force=True)
    sent.file_meta = pydicom.dataset.FileMetaDataset()
    sent.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    (record,) = _records(setup.archive, "1.2.826.9.1")
    with setup.archive.open(record) as stream:
        stored = pydicom.dcmread(stream)
    assert sent.PixelData == stored.PixelData
    assert sent.PatientName == stored.PatientName

    # Stored JPEG 2000, asked for uncompressed only: a failed sub-operation, named.
    study_uid = _a_study_with(setup.archive, "1.2.840.10008.1.2.4.90")
    records = _records(setup.archive, study_uid)
    compressed = [r for r in records if r.TransferSyntaxUID not in _UNCOMPRESSED_SYNTAXES]
    classes = {r.SOPClassUID: [ExplicitVRLittleEndian, ImplicitVRLittleEndian] for r in records}
    final, answer, received = _get(setup, _study(study_uid), classes)
    failing = len(compressed) == len(records)
    assert final.Status == (
        QueryStatus.OUT_OF_RESOURCES_SUB_OPERATIONS
        if failing
        else QueryStatus.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
    )
    assert final.NumberOfFailedSuboperations == len(compressed)
    assert answer is not None
    failed = answer.FailedSOPInstanceUIDList
    failed = [failed] if isinstance(failed, str) else list(failed)
    assert sorted(failed) == sorted(r.SOPInstanceUID for r in compressed)
    assert set(received) == {r.SOPInstanceUID for r in records} - set(failed)


_UNCOMPRESSED_SYNTAXES = {
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
}
GETSCU = shutil.which("getscu")


@pytest.mark.dcmtk
@pytest.mark.skipif(GETSCU is None, reason="dcmtk is not installed")
def test_movescu_and_getscu(setup: Setup, tmp_path: Path) -> None:
    study_uid = _a_study_with(setup.archive, "1.2.840.10008.1.2.4.80")
    records = _records(setup.archive, study_uid)
    setup.destination.received.clear()
    move = subprocess.run(
        [
            "movescu",
            "-S",
            "-aec",
            "FILMLESS",
            "-aem",
            "DEST",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study_uid}",
            "127.0.0.1",
            str(setup.config.port),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert move.returncode == 0, move.stderr
    assert set(setup.destination.received) == {r.SOPInstanceUID for r in records}

    # getscu proposes one transfer syntax family per SOP class: a study stored uncompressed
    # (explicit and implicit VR, converted as needed) comes back whole.
    uncompressed = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
    by_study: dict[str, list[InstanceRecord]] = {}
    for record in setup.archive.index.instances():
        by_study.setdefault(record.StudyInstanceUID, []).append(record)
    study_uid, records = next(
        (uid, rs)
        for uid, rs in by_study.items()
        if len(rs) > 1 and all(r.TransferSyntaxUID in uncompressed for r in rs)
    )
    out = tmp_path / "get"
    out.mkdir()
    get = subprocess.run(
        [
            "getscu",
            "-S",
            "-aec",
            "FILMLESS",
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study_uid}",
            "127.0.0.1",
            str(setup.config.port),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert get.returncode == 0, get.stderr
    files = {pydicom.dcmread(p).SOPInstanceUID: p for p in out.iterdir()}
    assert set(files) == {r.SOPInstanceUID for r in records}
    for record in records:
        with open(files[record.SOPInstanceUID], "rb") as stream:
            meta = read_file_meta(stream)
            body = stream.read()
        with setup.archive.open(record) as stored_stream:
            stored = pydicom.dcmread(stored_stream)
        got = pydicom.dcmread(files[record.SOPInstanceUID])
        assert meta.TransferSyntaxUID in uncompressed
        assert got.PixelData == stored.PixelData
        assert got.PatientName == stored.PatientName
        # pynetdicom re-encodes what it sends: every element equal, not every byte.
        assert got == stored
        assert len(body) > 0
