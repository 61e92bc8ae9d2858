"""C-ECHO and C-STORE over loopback with pynetdicom SCUs, every status checked; with
blobs in a folder and in object storage."""

from __future__ import annotations

import errno
import io
from collections import defaultdict
from pathlib import Path
from typing import IO, Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    MRImageStorage,
)
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs.archive import Archive
from pacs.dimse import spool
from pacs.dimse.reactor import MendedAE
from pacs.dimse.server import STORAGE_SOP_CLASSES, DimseConfig, start_dimse
from pacs.index import count_rows, instance
from pacs.part10 import read_file_meta
from pacs.status import StoreStatus
from pacs.store import FsBlobStore
from tests.conftest import free_port, with_policy
from tests.support.instances import ct_instance, part10
from tests.support.scu import associate, context_id, send_raw

CT_CONTEXT = [
    (CTImageStorage, [ExplicitVRLittleEndian]),
    (MRImageStorage, [ExplicitVRLittleEndian]),
]


EVERY_BLOB_STORE = True


def _body(data: bytes) -> tuple[str, str, str, bytes]:
    stream = io.BytesIO(data)
    meta = read_file_meta(stream)
    return (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
        meta.TransferSyntaxUID,
        stream.read(),
    )


def _send(
    assoc: Association, sop_class: str, sop_instance: str, syntax: str, data_set: bytes
) -> pydicom.Dataset:
    """One C-STORE on an open association, on the context of its class and syntax."""
    return send_raw(
        assoc,
        context_id=context_id(assoc, sop_class, syntax),
        SOPClassUID=sop_class,
        SOPInstanceUID=sop_instance,
        data_set=data_set,
    )


def _store(config: DimseConfig, data: bytes) -> pydicom.Dataset:
    sop_class, sop_instance, syntax, body = _body(data)
    assoc = associate(config, [(sop_class, [syntax])])
    assert assoc.is_established
    try:
        return _send(assoc, sop_class, sop_instance, syntax, body)
    finally:
        assoc.release()


def _nothing_left(archive: Archive) -> None:
    assert list(archive.store.staging.iterdir()) == []
    assert list(archive.store.listing()) == []
    with archive.index.reading() as conn:
        assert count_rows(conn, instance) == 0


def test_echo(dimse_server: DimseConfig) -> None:
    ae = MendedAE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", dimse_server.port, ae_title="FILMLESS")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_every_storage_class_is_accepted(dimse_server: DimseConfig) -> None:
    assert len(STORAGE_SOP_CLASSES) > 150
    # pynetdicom proposes at most 128 contexts per association: ask in slices.
    for start in range(0, len(STORAGE_SOP_CLASSES), 120):
        chunk = STORAGE_SOP_CLASSES[start : start + 120]
        assoc = associate(dimse_server, [(uid, [ExplicitVRLittleEndian]) for uid in chunk])
        assert assoc.is_established
        assert {cx.abstract_syntax for cx in assoc.accepted_contexts} == set(chunk)
        assoc.release()


def test_corpus_stored_as_sent(
    archive: Archive, dimse_server: DimseConfig, corpus: list[Path]
) -> None:
    """Every instance in its own transfer syntax; index and bytes checked one by one."""
    by_context: dict[tuple[str, str], list[Path]] = defaultdict(list)
    bodies: dict[str, tuple[str, bytes]] = {}
    for path in corpus:
        sop_class, sop_instance, syntax, body = _body(path.read_bytes())
        by_context[(sop_class, syntax)].append(path)
        bodies[sop_instance] = (syntax, body)
    assert len({syntax for _, syntax in by_context}) >= 8
    assoc = associate(dimse_server, [(c, [s]) for c, s in by_context])
    assert assoc.is_established
    for (sop_class, syntax), paths in by_context.items():
        cx = context_id(assoc, sop_class, syntax)
        for path in paths:
            _, sop_instance, _, body = _body(path.read_bytes())
            status = send_raw(
                assoc,
                context_id=cx,
                SOPClassUID=sop_class,
                SOPInstanceUID=sop_instance,
                data_set=body,
            )
            assert status.Status == StoreStatus.SUCCESS, status
    assoc.release()
    records = archive.index.instances()
    assert len(records) == len(corpus)
    for record in records:
        syntax, body = bodies[record.SOPInstanceUID]
        assert record.TransferSyntaxUID == syntax
        with archive.open(record) as stored:
            data = stored.read()
        assert _body(data)[3] == body
        assert record.size == len(data)
    assert list(archive.store.staging.iterdir()) == []


def _announced_ct() -> pydicom.Dataset:
    ds = ct_instance()
    part10(ds)
    return ds


@pytest.mark.parametrize(
    ("mutate", "status", "reason"),
    [
        (lambda ds: delattr(ds, "SOPInstanceUID"), StoreStatus.CANNOT_UNDERSTAND, "SOPInstanceUID"),
        (
            lambda ds: delattr(ds, "StudyInstanceUID"),
            StoreStatus.CANNOT_UNDERSTAND,
            "StudyInstanceUID",
        ),
        (
            lambda ds: setattr(ds, "StudyInstanceUID", "1.2.x.3"),
            StoreStatus.CANNOT_UNDERSTAND,
            "StudyInstanceUID",
        ),
        (
            lambda ds: delattr(ds, "SeriesInstanceUID"),
            StoreStatus.CANNOT_UNDERSTAND,
            "SeriesInstanceUID",
        ),
        (
            lambda ds: setattr(ds, "SeriesInstanceUID", "1.02.3"),
            StoreStatus.CANNOT_UNDERSTAND,
            "SeriesInstanceUID",
        ),
        (
            lambda ds: setattr(ds, "SOPClassUID", MRImageStorage),
            StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            "SOP Class",
        ),
    ],
    ids=[
        "no-sop-instance",
        "no-study",
        "bad-study",
        "no-series",
        "bad-series",
        "sop-class-in-data-set",
    ],
)
def test_bad_instances_get_a_failure_status(
    archive: Archive, dimse_server: DimseConfig, mutate: object, status: int, reason: str
) -> None:
    ds = _announced_ct()
    assert callable(mutate)
    mutate(ds)
    answer = _store(dimse_server, part10(ds, fill_meta=False))
    assert answer.Status == status
    assert reason in answer.ErrorComment
    _nothing_left(archive)


def test_unparseable_data_set(archive: Archive, dimse_server: DimseConfig) -> None:
    sop_class, sop_instance, syntax, body = _body(part10(ct_instance()))
    assoc = associate(dimse_server, CT_CONTEXT)
    for broken in (body[:-9], body[:200] + b"\xff\xff\xff\xff" * 8, b"\x00" * 3):
        answer = _send(assoc, sop_class, sop_instance, syntax, broken)
        assert answer.Status == StoreStatus.CANNOT_UNDERSTAND
    assoc.release()
    _nothing_left(archive)


def test_malformed_affected_sop_instance_uid(archive: Archive, dimse_server: DimseConfig) -> None:
    sop_class, _, syntax, body = _body(part10(ct_instance()))
    assoc = associate(dimse_server, CT_CONTEXT)
    answer = _send(assoc, sop_class, "1.2.3.abc", syntax, body)
    assoc.release()
    assert answer.Status == StoreStatus.CANNOT_UNDERSTAND
    _nothing_left(archive)


def test_sop_class_differs_from_presentation_context(
    archive: Archive, dimse_server: DimseConfig
) -> None:
    _, sop_instance, syntax, body = _body(part10(ct_instance()))
    assoc = associate(dimse_server, CT_CONTEXT)
    answer = send_raw(
        assoc,
        context_id=context_id(assoc, MRImageStorage, syntax),
        SOPClassUID=CTImageStorage,
        SOPInstanceUID=sop_instance,
        data_set=body,
    )
    assoc.release()
    assert answer.Status == StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    _nothing_left(archive)


def test_disk_write_error(
    archive: Archive, dimse_server: DimseConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    folder = isinstance(archive.store, FsBlobStore)
    monkeypatch.setattr(
        "pacs.store.os.fsync" if folder else "pacs.objectstore.obstore.put", disk_full
    )
    answer = _store(dimse_server, part10(ct_instance()))
    assert answer.Status == StoreStatus.OUT_OF_RESOURCES
    assert ("no space left" if folder else "object storage") in answer.ErrorComment
    monkeypatch.undo()
    _nothing_left(archive)


class _FillingDisk:
    """A staging file on a disk that has ``room`` bytes left: ENOSPC past them."""

    def __init__(self, out: IO[Any], room: int) -> None:
        self.out = out
        self.room = room

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()

    def fileno(self) -> int:
        return self.out.fileno()

    def close(self) -> None:
        self.out.close()


def test_disk_full_while_a_large_data_set_arrives(
    archive: Archive, dimse_server: DimseConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data set past the spool's memory is written to staging while it arrives, on a
    thread beside the receive. A failed write there is the request's Out of Resources
    (PS3.4 Table B.2-1, 0xA7xx) on an association that stays usable, not an abort, and
    leaves no staging file and no row."""
    real_open = open
    # Room for what the spool held in memory and the next PDU (1 MiB at most), not for
    # the rest: the failure comes from a write behind the receive.
    room = spool.MEMORY_LIMIT + (3 << 19)

    def filling(file: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        return _FillingDisk(handle, room) if mode == "xb" else handle

    large = ct_instance()
    pixels = np.zeros((1600, 1600), dtype=np.uint16)  # 5.1 MB, past MEMORY_LIMIT
    large.Rows, large.Columns = pixels.shape
    large.PixelData = pixels.tobytes()
    sop_class, sop_instance, syntax, body = _body(part10(large))
    assert len(body) > room + (1 << 20)
    monkeypatch.setattr("pacs.store.open", filling, raising=False)
    assoc = associate(dimse_server, CT_CONTEXT)
    try:
        answer = _send(assoc, sop_class, sop_instance, syntax, body)
        assert answer.Status == StoreStatus.OUT_OF_RESOURCES
        assert "no space left" in answer.ErrorComment
        assert list(archive.store.staging.iterdir()) == []
        monkeypatch.undo()
        assert assoc.is_established
        assert _send(assoc, sop_class, sop_instance, syntax, body).Status == StoreStatus.SUCCESS
    finally:
        assoc.release()
    assert [r.SOPInstanceUID for r in archive.index.instances()] == [sop_instance]
    assert list(archive.store.staging.iterdir()) == []


def test_duplicates_under_reject(archive: Archive, dimse_server: DimseConfig) -> None:
    ds = ct_instance()
    assert _store(dimse_server, part10(ds)).Status == StoreStatus.SUCCESS
    assert _store(dimse_server, part10(ds)).Status == StoreStatus.SUCCESS
    ds.PatientName = "Other^Name"
    answer = _store(dimse_server, part10(ds))
    assert answer.Status == StoreStatus.DUPLICATE_SOP_INSTANCE
    records = archive.index.instances()
    assert len(records) == 1
    with archive.open(records[0]) as stored:
        assert str(pydicom.dcmread(stored).PatientName) == "Test^Patient"


def test_duplicates_under_overwrite(archive: Archive) -> None:
    overwriting = with_policy(archive, "overwrite")
    config = DimseConfig(port=free_port())
    server = start_dimse(overwriting, config)
    try:
        ds = ct_instance()
        assert _store(config, part10(ds)).Status == StoreStatus.SUCCESS
        ds.PatientName = "Other^Name"
        assert _store(config, part10(ds)).Status == StoreStatus.SUCCESS
    finally:
        server.shutdown()
    records = overwriting.index.instances()
    assert len(records) == 1
    with overwriting.open(records[0]) as stored:
        assert str(pydicom.dcmread(stored).PatientName) == "Other^Name"
    assert len(list(overwriting.store.listing())) == 1


def test_calling_ae_allow_list(archive: Archive) -> None:
    config = DimseConfig(port=free_port(), allowed_calling_aets=("MODALITY",))
    server = start_dimse(archive, config)
    try:
        refused = associate(config, CT_CONTEXT, calling="INTRUDER")
        assert refused.is_rejected
        accepted = associate(config, CT_CONTEXT, calling="MODALITY")
        assert accepted.is_established
        accepted.release()
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("proposed", "accepted"),
    [
        ([ExplicitVRLittleEndian, JPEG2000Lossless], JPEG2000Lossless),
        ([JPEGBaseline8Bit, ExplicitVRLittleEndian], ExplicitVRLittleEndian),
        ([ImplicitVRLittleEndian, ExplicitVRLittleEndian], ExplicitVRLittleEndian),
        ([JPEGBaseline8Bit], JPEGBaseline8Bit),
    ],
)
def test_transfer_syntax_preference(
    dimse_server: DimseConfig, proposed: list[str], accepted: str
) -> None:
    """Lossless compressed as sent, then uncompressed, lossy only when nothing else is offered."""
    assoc = associate(dimse_server, [(CTImageStorage, proposed)])
    assert assoc.is_established
    assert assoc.accepted_contexts[0].transfer_syntax[0] == accepted
    assert assoc.acceptor.implementation_version_name == "FILMLESS_010"
    assoc.release()
