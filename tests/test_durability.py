"""Nothing acknowledged is lost: many concurrent associations, and ``kill -9`` of the
whole server (acceptor and DIMSE workers) in the middle of ingest, five times, on SQLite,
on PostgreSQL, and on PostgreSQL with the blobs in object storage. Every instance that
got Success must come back bit for bit."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from pacs.dimse.reactor import MendedAE
from pacs.index import Index
from pacs.part10 import read_file_meta
from pacs.store import BlobStore, FsBlobStore
from tests.conftest import s3_store
from tests.support.postgres import PostgresServer
from tests.support.s3 import SeaweedServer
from tests.support.scu import store
from tests.support.server import Server

pytestmark = pytest.mark.slow


def _write_instances(folder: Path, count: int, seed: int) -> list[Path]:
    """Small distinct Secondary Capture images as Part 10 files, a few studies' worth."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    studies = [(generate_uid(), generate_uid()) for _ in range(max(1, count // 50))]
    paths = []
    for number in range(count):
        which = number % len(studies)
        study, series = studies[which]
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        # One patient per study: an instance naming another patient's study is refused.
        ds.PatientID = f"DUR{which % 7}"
        ds.PatientName = f"Durable^{which % 7}"
        ds.Modality = "OT"
        ds.InstanceNumber = number + 1
        ds.Rows = ds.Columns = 48
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = rng.integers(0, 4096, (48, 48), dtype=np.uint16).tobytes()
        path = folder / f"{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _body(stream: BinaryIO) -> bytes:
    read_file_meta(stream)
    return stream.read()


class Sender:
    """Sends files in order over ``associations`` associations, noting every Success."""

    def __init__(self, port: int, paths: list[Path], associations: int) -> None:
        self.port = port
        self.paths = paths
        self.associations = associations
        self.acknowledged: set[str] = set()
        self.next = 0
        self.lock = threading.Lock()

    def _take(self) -> Path | None:
        with self.lock:
            if self.next >= len(self.paths):
                return None
            self.next += 1
            return self.paths[self.next - 1]

    def run_until_failure(self, *, wait: float | None = 120) -> None:
        """Until the files run out or the server goes away; files in flight are resent.

        ``wait``: how long to wait for the associations to end (a round that is killed);
        None waits as long as they send (a run expected to complete: on a busy machine
        it may take minutes, and cutting it short would lose files, not find a fault).
        """

        def one() -> None:
            ae = MendedAE(ae_title="DURABLE")
            ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", self.port, ae_title="FILMLESS")
            if not assoc.is_established:
                return
            finished = False
            try:
                while (path := self._take()) is not None:
                    try:
                        status = store(assoc, path)
                    except (OSError, RuntimeError, ValueError):
                        return
                    if not assoc.is_established or "Status" not in status:
                        return
                    if status.Status == 0x0000:
                        with self.lock:
                            self.acknowledged.add(path.name)
                finished = True
            finally:
                # A server that vanished answers no A-RELEASE: waiting for its reply
                # would only run out the ACSE timeout.
                if finished:
                    assoc.release()
                else:
                    assoc.abort()
                # pynetdicom keeps its socket when the peer vanished mid-association.
                transport = assoc.dul.socket
                if transport is not None and transport.socket is not None:
                    transport.socket.close()

        threads = [threading.Thread(target=one) for _ in range(self.associations)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(wait)
        # What was sent but not acknowledged goes again after the restart.
        with self.lock:
            self.paths = [p for p in self.paths if p.name not in self.acknowledged]
            self.next = 0


def _check_all_stored(store: BlobStore, index_url: str, paths: list[Path]) -> None:
    index = Index(index_url)
    try:
        records = {r.SOPInstanceUID: r for r in index.instances()}
    finally:
        index.dispose()
    for path in paths:
        with path.open("rb") as stream:
            meta = read_file_meta(stream)
            sent = stream.read()
        record = records.get(meta.MediaStorageSOPInstanceUID)
        assert record is not None, f"{path.name} was acknowledged and is not indexed"
        with store.open(record.path) as stored:
            assert _body(stored) == sent, f"{path.name} differs from what was sent"
    assert list(store.staging.iterdir()) == []
    blobs = sum(1 for _ in store.listing())
    assert blobs == len(records), "blobs in the store and rows in the index differ"


def test_eight_associations_of_250_instances(tmp_path: Path) -> None:
    paths = _write_instances(tmp_path / "send", 2000, seed=11)
    server = Server(tmp_path / "data", FILMLESS_SCREENING="false", FILMLESS_DIMSE_WORKERS="2")
    server.start()
    try:
        sender = Sender(server.port, paths, associations=8)
        sender.run_until_failure(wait=None)
    finally:
        assert server.stop() == 0
    assert len(sender.acknowledged) == 2000
    url = f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}"
    _check_all_stored(FsBlobStore(tmp_path / "data"), url, paths)
    index = Index(url)
    try:
        assert len(index.instances()) == 2000
    finally:
        index.dispose()


@pytest.mark.parametrize(
    "backend",
    [
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.postgresql),
        pytest.param("postgresql+s3", marks=[pytest.mark.postgresql, pytest.mark.s3]),
    ],
)
def test_kill_9_five_times_during_ingest(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    if backend.startswith("postgresql"):
        postgres: PostgresServer = request.getfixturevalue("postgres")
        url = postgres.fresh_database()
    else:
        url = f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}"
    blobs: dict[str, str] = {}
    store: BlobStore = FsBlobStore(tmp_path / "data")
    if backend.endswith("s3"):
        seaweedfs: SeaweedServer = request.getfixturevalue("seaweedfs")
        prefix = seaweedfs.fresh_prefix()
        blobs = seaweedfs.settings(prefix)
        store = s3_store(seaweedfs, tmp_path / "checking", prefix)
    # Enough that the fifth kill (at most 5 x 160 acknowledged) still finds some to send.
    paths = _write_instances(tmp_path / "send", 1000, seed=5)
    server = Server(
        tmp_path / "data",
        FILMLESS_SCREENING="false",
        FILMLESS_DIMSE_WORKERS="2",
        FILMLESS_INDEX_URL=url,
        **blobs,
    )
    sender = Sender(0, paths, associations=4)
    chance = random.Random(9)
    kills = 0
    while kills < 5:
        server.start()
        sender.port = server.port
        before = len(sender.acknowledged)
        worker = threading.Thread(target=sender.run_until_failure)
        worker.start()
        # Kill once storing is well under way, at a point that differs each round.
        deadline = time.monotonic() + 60
        target = before + chance.randint(40, 160)
        while len(sender.acknowledged) < target and time.monotonic() < deadline:
            time.sleep(0.005)
        server.kill(whole_group=True)
        kills += 1
        worker.join(120)
        assert len(sender.acknowledged) > before, "nothing was stored in this round"
    # A last clean run: the startup pass reconciles what the kills left behind. It sends
    # until everything is acknowledged (an association that ends is opened again).
    server.start()
    try:
        sender.port = server.port
        for _round in range(5):
            sender.run_until_failure(wait=None)
            if len(sender.acknowledged) == len(paths):
                break
    finally:
        assert server.stop() == 0
    assert len(sender.acknowledged) == len(paths)
    _check_all_stored(store, url, paths)
    assert list((tmp_path / "data" / "staging").iterdir()) == []
    verify = subprocess.run(
        [sys.executable, "-m", "filmless.cli", "verify"],
        env={
            **os.environ,
            "FILMLESS_DATA_DIR": str(tmp_path / "data"),
            "FILMLESS_INDEX_URL": url,
            **blobs,
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
