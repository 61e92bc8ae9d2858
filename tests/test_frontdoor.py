"""The DIMSE front door: handshake deadline, association caps, AE rules per network, big
data sets received in pieces. In-process server, real pynetdicom peers on loopback."""

from __future__ import annotations

import io
import json
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom.association import Association

from pacs.archive import Archive
from pacs.audit import AuditTrail
from pacs.dimse import spool
from pacs.dimse.frontdoor import AssociationCounts, CallingRules, Refusal, calling_ae_title
from pacs.dimse.reactor import MendedAE
from pacs.dimse.server import DimseConfig, start_dimse
from pacs.errors import StorageFailure
from pacs.index import Index
from pacs.part10 import FileMeta, encode_file_meta, read_file_meta
from pacs.store import FsBlobStore, StagingWriter
from scripts.hostile import associate_rq
from tests.conftest import free_port
from tests.support.server import closed_by_peer


def _config(**changes: object) -> DimseConfig:
    base = {"port": free_port(), "acse_timeout": 10.0, "dimse_timeout": 30.0}
    return DimseConfig(**{**base, **changes})  # type: ignore[arg-type]


@pytest.fixture
def audited(tmp_path: Path) -> Iterator[Archive]:
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    index.create_schema()
    try:
        yield Archive(
            FsBlobStore(tmp_path / "data"), index, audit=AuditTrail(tmp_path / "audit.jsonl")
        )
    finally:
        index.dispose()


def _associate(port: int, *, calling: str = "MODALITY", source: str = "127.0.0.1") -> Association:
    ae = MendedAE(ae_title=calling)
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae.associate("127.0.0.1", port, ae_title="FILMLESS", bind_address=(source, 0))


def _image(size: int) -> Dataset:
    """A Secondary Capture image with about ``size`` bytes of pixel data."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "FRONTDOOR"
    ds.PatientName = "Door^Front"
    ds.Modality = "OT"
    side = int((size // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    pixels = np.random.default_rng(3).integers(0, 65535, (side, side), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _rss_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_calling_rules_per_network() -> None:
    rules = CallingRules.parse({"10.1.0.0/16": ["CT1", "CR2"], "192.168.5.7": ["*"]})
    assert rules.allows("10.1.2.3", "CT1")
    assert not rules.allows("10.1.2.3", "MR9")
    assert not rules.allows("10.2.0.1", "CT1")
    assert rules.allows("192.168.5.7", "ANYONE")
    assert not rules.allows("not-an-address", "CT1")
    assert CallingRules().allows("203.0.113.9", "WHOEVER")
    with pytest.raises(ValueError, match="not a network"):
        CallingRules.parse({"10.1.0.0/33": ["CT1"]})


def test_counts_hold_across_rows() -> None:
    counts = AssociationCounts(rows=2, slots=4)
    first, second = counts.for_row(0), counts.for_row(1)
    assert first.admit("10.0.0.1", max_total=3, max_per_host=2) is None
    assert second.admit("10.0.0.1", max_total=3, max_per_host=2) is None
    reason = first.admit("10.0.0.1", max_total=3, max_per_host=2)
    assert reason is not None
    assert "limit per peer is 2" in reason
    assert second.admit("10.0.0.2", max_total=3, max_per_host=2) is None
    reason = first.admit("10.0.0.3", max_total=3, max_per_host=2)
    assert reason is not None
    assert "limit is 3" in reason
    second.release("10.0.0.1")
    assert first.admit("10.0.0.1", max_total=3, max_per_host=2) is None
    # A worker that died: its row is cleared, the others keep theirs.
    counts.clear_row(1)
    assert counts.total() == 2


def test_rejection_pdu_is_ps38_a_associate_rj() -> None:
    pdu = Refusal("busy").pdu()
    assert pdu == bytes([0x03, 0x00, 0, 0, 0, 4, 0x00, 2, 3, 2])
    request = bytes(10) + b"FILMLESS".ljust(16) + b"MODALITY".ljust(16)
    assert calling_ae_title(request) == "MODALITY"


def test_idle_connections_do_not_hold_association_places(audited: Archive) -> None:
    """pynetdicom alone: 11 idle sockets refused every association for acse_timeout."""
    config = _config(max_associations=2, handshake_timeout=1.5)
    server = start_dimse(audited, config)
    idle = [socket.create_connection(("127.0.0.1", config.port)) for _ in range(20)]
    try:
        assoc = _associate(config.port)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        # Past the handshake time the server has closed every idle one.
        time.sleep(2.5)
        for sock in idle:
            assert closed_by_peer(sock, 2)
    finally:
        for sock in idle:
            sock.close()
        server.shutdown()


def test_oversize_association_request_is_dropped_unread(audited: Archive) -> None:
    config = _config()
    server = start_dimse(audited, config)
    try:
        with socket.create_connection(("127.0.0.1", config.port)) as sock:
            sock.sendall(struct.pack(">BBL", 0x01, 0, 512 << 20) + bytes(4096))
            assert closed_by_peer(sock)
        # Not an A-ASSOCIATE-RQ at all: closed as well.
        with socket.create_connection(("127.0.0.1", config.port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert closed_by_peer(sock)
        assoc = _associate(config.port)
        assert assoc.is_established
        assoc.release()
    finally:
        server.shutdown()


def test_association_caps_total_and_per_peer(audited: Archive, tmp_path: Path) -> None:
    config = _config(max_associations=3, max_associations_per_host=2)
    server = start_dimse(audited, config)
    open_ones: list[Association] = []
    try:
        for _ in range(2):
            open_ones.append(_associate(config.port))
            assert open_ones[-1].is_established
        refused = _associate(config.port)
        assert refused.is_rejected
        rejection = refused.acceptor.primitive
        assert rejection is not None
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
        # Another peer address still gets in, up to the total.
        open_ones.append(_associate(config.port, source="127.0.0.2"))
        assert open_ones[-1].is_established
        assert _associate(config.port, source="127.0.0.3").is_rejected
        # A released association gives its place back (once its thread has ended).
        open_ones.pop(0).release()
        deadline = time.monotonic() + 10
        while server.front_door.counts.total() > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        again = _associate(config.port)
        assert again.is_established
        open_ones.append(again)
    finally:
        for assoc in open_ones:
            assoc.release()
        server.shutdown()
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    refusals = [line for line in lines if "association rejected" in line["Detail"]]
    assert len(refusals) == 2
    assert "limit per peer is 2" in refusals[0]["Detail"]
    assert refusals[1]["ActiveParticipant"]["NetworkAccessPointID"] == "127.0.0.3"


def test_calling_ae_rules_per_network(audited: Archive) -> None:
    config = _config(calling_aets_by_network=(("127.0.0.1/32", ("MODALITY",)),))
    server = start_dimse(audited, config)
    try:
        allowed = _associate(config.port)
        assert allowed.is_established
        allowed.release()
        wrong_title = _associate(config.port, calling="INTRUDER")
        assert wrong_title.is_rejected
        rejection = wrong_title.acceptor.primitive
        assert rejection is not None
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (1, 1, 3)
        assert _associate(config.port, source="127.0.0.2").is_rejected
    finally:
        server.shutdown()


def test_large_data_set_goes_to_staging_in_pieces(audited: Archive) -> None:
    """A 48 MiB instance: stored bit for bit, without a whole copy of it in memory."""
    config = _config()
    server = start_dimse(audited, config)
    ds = _image(48 << 20)
    expected = io.BytesIO()
    ds.save_as(expected, enforce_file_format=True)
    try:
        assoc = _associate(config.port)
        before = _rss_peak()
        status = assoc.send_c_store(ds)
        grown = _rss_peak() - before
        assoc.release()
    finally:
        server.shutdown()
    assert status.Status == 0x0000
    record = audited.index.instance(ds.SOPInstanceUID)
    assert record is not None
    with audited.open(record) as stored:
        read_file_meta(stored)
        body = stored.read()
    expected.seek(0)
    read_file_meta(expected)
    assert body == expected.read()
    # Sending keeps one encoded copy in this process (pynetdicom's SCU); receiving
    # would have added two more (BytesIO, then its copy) without the spool.
    assert grown < 72 << 20, grown
    assert list(audited.store.staging.iterdir()) == []


def test_aborted_transfer_leaves_no_staging_file(audited: Archive) -> None:
    config = _config()
    server = start_dimse(audited, config)
    try:
        store = audited.store
        spooled = spool.Spool(store)
        # What pynetdicom writes: preamble, prefix, its meta group, then fragments.
        meta = FileMeta(SecondaryCaptureImageStorage, generate_uid(), ExplicitVRLittleEndian)
        head = encode_file_meta(meta)
        spooled.write(head[:128])
        spooled.write(head[128:132])
        spooled.write(head[132:])
        spooled.write(bytes(spool.MEMORY_LIMIT + 1))
        assert len(list(store.staging.iterdir())) == 1
        del spooled
        assert list(store.staging.iterdir()) == []
    finally:
        server.shutdown()


def test_a_write_that_fails_behind_the_receive_neither_blocks_it_nor_is_lost(
    audited: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the spool's memory, pieces are written on a thread of their own: whatever
    that write raises, receiving goes on (more pieces than may wait), and the data set
    ends as a storage failure with no staging file left."""
    store = audited.store
    real_write = StagingWriter.write

    def broken(self: StagingWriter, data: bytes | bytearray | memoryview) -> None:
        if len(data) > 1024:  # the Part 10 head goes through, the data set does not
            raise RuntimeError("controller reset")
        real_write(self, data)

    monkeypatch.setattr(StagingWriter, "write", broken)
    spooled = spool.Spool(store)
    spooled.meta = FileMeta(SecondaryCaptureImageStorage, generate_uid(), ExplicitVRLittleEndian)
    piece = bytes(1 << 20)
    for _ in range(3 + 2 * spool.IN_FLIGHT):
        spooled.write(piece)
    with pytest.raises(StorageFailure, match="controller reset"):
        spooled.staged()
    spooled.discard()
    assert list(store.staging.iterdir()) == []


def _answer_to(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        return sock.recv(64)


@pytest.mark.parametrize(
    ("request_bytes", "reason"),
    [
        (associate_rq(context_id=2), "presentation context ID 2 is not odd"),
        (associate_rq(context_id=0), "presentation context ID 0 is not odd"),
        (associate_rq(identity=b"\x09\x00\x00\x01x\x00\x00"), "user identity type 9"),
    ],
)
def test_malformed_requests_are_refused_at_once_and_give_their_place_back(
    audited: Archive, request_bytes: bytes, reason: str
) -> None:
    """pynetdicom's reader dies on these and the association keeps its place until the
    ACSE timeout (PS3.8 9.3.2.2: context IDs are odd). Refused here, A-ASSOCIATE-RJ
    permanent, before pynetdicom; with one association allowed, a real peer gets in
    right after."""
    config = _config(max_associations=1, acse_timeout=60.0)
    server = start_dimse(audited, config)
    try:
        for _ in range(3):
            answer = _answer_to(config.port, request_bytes)
            assert answer[0] == 0x03  # A-ASSOCIATE-RJ
            assert answer[7] == 1  # rejected-permanent
        assoc = _associate(config.port)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        server.shutdown()
    assert reason in audited.audit.path.read_text()  # type: ignore[union-attr]


def test_the_called_ae_title_is_checked(audited: Archive) -> None:
    """As Orthanc's DicomCheckCalledAet: a request for another AE title is refused with
    reason 7, called-AE-title-not-recognized (PS3.8 9.3.4)."""
    config = _config()
    server = start_dimse(audited, config)
    try:
        answer = _answer_to(config.port, associate_rq(called="ANY-SCP"))
        assert answer[0] == 0x03
        assert (answer[7], answer[8], answer[9]) == (1, 1, 7)
        assert _answer_to(config.port, associate_rq())[0] == 0x02  # A-ASSOCIATE-AC
    finally:
        server.shutdown()
    open_server = start_dimse(audited, _config(check_called_aet=False))
    try:
        port = open_server.server_address[1]
        assert _answer_to(port, associate_rq(called="ANY-SCP"))[0] == 0x02
    finally:
        open_server.shutdown()


def test_one_address_cannot_fill_the_negotiating_places(audited: Archive) -> None:
    """Silent connections from one peer stop at max_pending_per_host; another peer
    still gets in while they wait (here 127.0.0.2, another loopback address)."""
    config = _config(max_pending_connections=8, max_pending_per_host=4, handshake_timeout=30.0)
    server = start_dimse(audited, config)
    silent = [socket.create_connection(("127.0.0.1", config.port)) for _ in range(8)]
    try:
        closed = sum(closed_by_peer(s, within=5) for s in silent[4:])
        assert closed == 4
        assoc = _associate(config.port, source="127.0.0.2")
        assert assoc.is_established
        assoc.release()
    finally:
        for sock in silent:
            sock.close()
        server.shutdown()


def test_an_identifier_larger_than_the_limit_ends_the_association(audited: Archive) -> None:
    """A C-FIND identifier is gathered in memory: past max_identifier_bytes the
    association is aborted, and the server goes on serving others."""
    config = _config(max_identifier_bytes=64 << 10)
    server = start_dimse(audited, config)
    try:
        ae = MendedAE(ae_title="FINDER")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.1")
        ae.maximum_pdu_size = 16384
        assoc = ae.associate("127.0.0.1", config.port, ae_title="FILMLESS")
        assert assoc.is_established
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.add_new(0x0040A160, "UT", "x" * (1 << 20))  # 1 MiB in one element
        answers = list(assoc.send_c_find(identifier, "1.2.840.10008.5.1.4.1.2.2.1"))
        assert all(status is None or "Status" not in status for status, _ in answers)
        deadline = time.monotonic() + 30  # the A-ABORT reaches the peer's reader thread
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not assoc.is_established
        small = _associate(config.port)
        assert small.is_established
        assert small.send_c_echo().Status == 0
        small.release()
    finally:
        server.shutdown()
