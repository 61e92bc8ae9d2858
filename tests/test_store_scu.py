"""The archive's own Storage SCU (routing and report forwarding) against real peers:
filmless on both of its receive paths, a pynetdicom SCP that accepts only Explicit VR
Little Endian, and dcmtk's storescp. pydicom's test files, in their many syntaxes,
arrive as they were sent (PS3.4 B.2: the SCU sends the data set; PS3.5 10: the transfer
syntax is the one negotiated for the context)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless
from pynetdicom import AE, evt

from pacs.archive import Archive, InstanceSource
from pacs.dimse.server import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, DimseConfig, start_dimse
from pacs.forward import ForwardFailed, Sender, destination
from pacs.index import Index
from pacs.part10 import read_file_meta
from tests.conftest import free_port, make_archive
from tests.support.instances import ct_instance, part10

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _pydicom_files() -> list[Path]:
    """pydicom's files with a storage SOP class and a syntax filmless accepts, whose
    meta group names their data set, each SOP Instance UID once."""
    found, seen = [], set()
    for path in sorted(TEST_FILES.glob("*.dcm")):
        try:
            with path.open("rb") as stream:
                meta = InstanceSource.from_part10(stream).meta
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if (
            "StudyInstanceUID" in header
            and "SeriesInstanceUID" in header
            # What the archive stores: a meta group naming its own data set.
            and header.get("SOPInstanceUID") == meta.MediaStorageSOPInstanceUID
            and header.get("SOPClassUID") == meta.MediaStorageSOPClassUID
            and meta.MediaStorageSOPClassUID in STORAGE_SOP_CLASSES
            and meta.TransferSyntaxUID in TRANSFER_SYNTAXES
            and meta.MediaStorageSOPInstanceUID
            and meta.MediaStorageSOPInstanceUID not in seen
            and path.stat().st_size < 4 << 20
        ):
            seen.add(meta.MediaStorageSOPInstanceUID)
            found.append(path)
    return found


def _data_set(path: Path) -> bytes:
    with path.open("rb") as stream:
        read_file_meta(stream)
        return stream.read()


@pytest.fixture(params=[True, False], ids=["direct", "pynetdicom"])
def peer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Archive, DimseConfig]]:
    index = Index(f"sqlite:///{tmp_path / 'peer.sqlite'}")
    index.create_schema()
    archive = make_archive(tmp_path / "peer", index)
    config = DimseConfig(
        ae_title="PEER", port=free_port(), max_pdu=16384, direct_associations=request.param
    )
    server = start_dimse(archive, config)
    try:
        yield archive, config
    finally:
        server.shutdown()
        index.dispose()


def test_pydicom_files_arrive_as_they_were_stored(
    peer: tuple[Archive, DimseConfig],
) -> None:
    """Over one kept association where the class and syntax repeat, in 16 KiB PDUs."""
    archive, config = peer
    files = _pydicom_files()
    assert len(files) >= 30
    sender = Sender(destination("peer", f"PEER@127.0.0.1:{config.port}"), calling_ae="H", keep=60)
    try:
        for path in files:
            sender.send_file(path)
    finally:
        sender.close()
    stored = {r.SOPInstanceUID: r for r in archive.index.instances()}
    assert len(stored) == len(files)
    for path in files:
        with path.open("rb") as stream:
            meta = InstanceSource.from_part10(stream).meta
        record = stored[meta.MediaStorageSOPInstanceUID]
        assert record.TransferSyntaxUID == meta.TransferSyntaxUID
        with archive.open(record) as copy:
            read_file_meta(copy)
            assert copy.read() == _data_set(path), path.name


def test_refusals_carry_the_peers_status_and_reason(
    peer: tuple[Archive, DimseConfig],
) -> None:
    archive, config = peer
    target = destination("peer", f"PEER@127.0.0.1:{config.port}")
    first = ct_instance()
    Sender(target, calling_ae="H").send(_stream(first))
    other = ct_instance(study=first.StudyInstanceUID, patient_id="ANOTHER")
    with pytest.raises(ForwardFailed, match=r"answered C-STORE with 0xA900 .*another patient"):
        Sender(target, calling_ae="H").send(_stream(other))
    wrong = destination("peer", f"NOTPEER@127.0.0.1:{config.port}")
    with pytest.raises(ForwardFailed, match="rejected the association"):
        Sender(wrong, calling_ae="H").send(_stream(ct_instance()))
    down = destination("peer", f"PEER@127.0.0.1:{free_port()}")
    with pytest.raises(ForwardFailed, match="cannot be reached"):
        Sender(down, calling_ae="H").send(_stream(ct_instance()))
    assert len(archive.index.instances()) == 1


def _stream(ds: Dataset) -> BytesIO:
    return BytesIO(part10(ds))


def test_a_peer_that_takes_only_explicit_little_endian_gets_it_decompressed() -> None:
    """The stored syntax is proposed first, Explicit VR Little Endian as the fallback
    (as Orthanc and dcm4chee do); a peer that accepts nothing of the two is a reason."""
    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    ae = AE(ae_title="PICKY")
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        ds = ct_instance()
        pixels = ds.pixel_array.copy()
        ds.compress(RLELossless)
        target = destination("picky", f"PICKY@127.0.0.1:{port}")
        Sender(target, calling_ae="H").send(_stream(ds))
        (got,) = received
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(got.pixel_array, pixels)
        assert got.SOPInstanceUID == ds.SOPInstanceUID
        mr = ct_instance()
        mr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage: not offered
        with pytest.raises(ForwardFailed, match=r"accepts .* in neither"):
            Sender(target, calling_ae="H").send(_stream(mr))
    finally:
        assert server is not None
        server.shutdown()


@pytest.mark.dcmtk
def test_dcmtk_storescp_receives_the_same_instances(tmp_path: Path) -> None:
    if shutil.which("storescp") is None:
        pytest.skip("dcmtk is not installed")
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    process = subprocess.Popen(
        ["storescp", "--accept-all", "-od", str(out), "-aet", "STORESCP", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        files = _pydicom_files()[:10]
        target = destination("dcmtk", f"STORESCP@127.0.0.1:{port}")
        sender = Sender(target, calling_ae="H", keep=60)
        while True:
            try:
                sender.send_file(files[0])
                break
            except ForwardFailed:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        for path in files[1:]:
            sender.send_file(path)
        sender.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    received = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in out.iterdir()}
    for path in files:
        sent = pydicom.dcmread(path)
        got = pydicom.dcmread(received[str(sent.SOPInstanceUID)])
        # storescp writes what it decoded: group lengths it computes (retired, PS3.5
        # 7.2), OB for encapsulated Pixel Data (PS3.5 A.4) whatever the file said, no
        # trailing padding (which any application may drop, PS3.10 7.2). The same
        # values otherwise.
        assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID

        def kept(ds: Dataset) -> dict[object, object]:
            return {e.tag: e.value for e in ds if e.tag.element != 0 and e.tag != 0xFFFCFFFC}

        assert kept(got) == kept(sent), path.name
