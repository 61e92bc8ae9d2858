"""Several nodes on one PostgreSQL index and one bucket: what one stores, another finds,
retrieves, renders and deletes; screening runs once, whichever node claims it; a
``--role worker`` node screens without a port. Nothing that matters lives in a node:
the node that stored the instances is stopped before the others read them."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset

from pacs.index import Index
from pacs.jobs import JobQueue, JobState
from pacs.part10 import read_file_meta
from scripts.synthetic_corpus import Patient, Rng, chest_dx
from tests.conftest import s3_store
from tests.support.dcmtk import storescu
from tests.support.postgres import PostgresServer
from tests.support.s3 import SeaweedServer
from tests.support.scu import find
from tests.support.server import LoggedProcess, Server
from tests.support.web import parts

pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgresql,
    pytest.mark.s3,
    pytest.mark.dcmtk,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed"),
    pytest.mark.timeout(900),
]

WAIT_SECONDS = 300


def _studies(first: int, count: int, folder: Path) -> dict[str, list[Path]]:
    """Chest X-ray studies of patients ``NODE{n}`` (PA + lateral: one report each)."""
    folder.mkdir(parents=True, exist_ok=True)
    studies: dict[str, list[Path]] = {}
    for n in range(first, first + count):
        patient = Patient(f"NODE{n}", f"Node^Patient{n}", "ISO_IR 100", "19700101", "M")
        for ds in chest_dx(Rng(100 + n), patient, 0.05, "20261201", f"ACC{n}"):
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            studies.setdefault(str(ds.StudyInstanceUID), []).append(path)
    return studies


def _send(port: int, studies: dict[str, list[Path]]) -> None:
    storescu(port, [path for paths in studies.values() for path in paths])


def _c_find_studies(port: int, patient_id: str) -> set[str]:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    query.StudyInstanceUID = ""
    return {str(identifier.StudyInstanceUID) for identifier in find(port, query)}


def _reports(url: str, study: str) -> int:
    answer = httpx.get(f"{url}/studies/{study}/instances", params={"Modality": "SR"})
    return len(answer.json()) if answer.status_code == 200 else 0


def _wait_for_reports(url: str, studies: dict[str, list[Path]]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not all(_reports(url, study) >= 1 for study in studies):
        assert time.monotonic() < deadline, "the reports did not come"
        time.sleep(0.5)


def _listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on, from its socket descriptors and /proc/net."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


def _worker_node(data_dir: Path, settings: dict[str, str]) -> LoggedProcess:
    return LoggedProcess(
        [sys.executable, "-m", "filmless.cli", "serve", "--role", "worker"],
        env={**os.environ, "FILMLESS_DATA_DIR": str(data_dir), **settings},
        start_new_session=True,
    )


def test_nodes_share_one_index_and_one_bucket(
    postgres: PostgresServer, seaweedfs: SeaweedServer, demo_models: Path, tmp_path: Path
) -> None:
    url = postgres.fresh_database()
    prefix = seaweedfs.fresh_prefix()
    shared = {
        "FILMLESS_INDEX_URL": url,
        **seaweedfs.settings(prefix),
        "FILMLESS_MODELS_DIR": str(demo_models),
        "FILMLESS_INFERENCE_MAX_WAIT_MS": "20",
        "FILMLESS_DIMSE_WORKERS": "1",
    }
    first = Server(tmp_path / "a", **shared)  # stores and screens
    second = Server(tmp_path / "b", **shared, FILMLESS_SCREENING="false")  # stores, serves
    first.start()
    second.start()
    assert first.process is not None
    screeners = {str(first.process.pid)}
    worker = _worker_node(tmp_path / "w", shared)
    screeners.add(str(worker.pid))
    try:
        studies = _studies(0, 4, tmp_path / "send")
        _send(first.port, studies)
        _wait_for_reports(second.url, studies)
        assert first.stop() == 0, first.output.decode(errors="replace")[-3000:]

        # Everything the first node stored is the second's too.
        study, paths = next(iter(studies.items()))
        assert _c_find_studies(second.port, "NODE0") == {study}
        for path in paths:
            with path.open("rb") as stream:
                meta = read_file_meta(stream)
                sent = stream.read()
            sop = meta.MediaStorageSOPInstanceUID
            (listed,) = httpx.get(f"{second.url}/instances", params={"SOPInstanceUID": sop}).json()
            series = listed["0020000E"]["Value"][0]
            instance = f"{second.url}/studies/{study}/series/{series}/instances/{sop}"
            answer = httpx.get(
                instance, headers={"Accept": 'multipart/related; type="application/dicom"'}
            )
            assert answer.status_code == 200
            ((_, body),) = parts(answer)
            stored = body[body.index(b"DICM") + 4 :]
            assert stored.endswith(sent)
            rendered = httpx.get(f"{instance}/rendered", headers={"Accept": "image/png"})
            assert rendered.status_code == 200
            assert rendered.content.startswith(b"\x89PNG")

        # Screening ran once per job, on the first node or the worker, never on the
        # second (screening off there).
        index = Index(url)
        try:
            jobs = JobQueue(index).jobs()
            assert Counter((j.SOPInstanceUID, j.model) for j in jobs).most_common(1)[0][1] == 1
            assert {j.state for j in jobs} <= {JobState.DONE, JobState.SKIPPED}
            assert all(j.attempts <= 1 for j in jobs)
            for each in studies:
                assert _reports(second.url, each) == 1
            assert {j.worker.rpartition("-")[2] for j in jobs if j.worker} <= screeners
        finally:
            index.dispose()

        # The worker opens no port, and screens what others store while no other
        # node screens: the first is gone, the second screens nothing.
        assert worker.poll() is None
        assert _listening_ports(worker.pid) == set()
        later = _studies(10, 2, tmp_path / "later")
        _send(second.port, later)
        _wait_for_reports(second.url, later)

        # Deleted on the second node: gone from the index and the bucket.
        assert httpx.delete(f"{second.url}/studies/{study}").status_code == 204
        assert httpx.delete(f"{second.url}/studies/{study}").status_code == 404  # nothing left
        found = httpx.get(f"{second.url}/studies", params={"StudyInstanceUID": study})
        assert found.status_code in (200, 204)
        assert found.content in (b"", b"[]")
        bucket = s3_store(seaweedfs, tmp_path / "checking", prefix)
        assert not any(study in blob.relative for blob in bucket.listing())
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=60)
        for node in (first, second):
            if node.process is not None and node.process.poll() is None:
                node.stop()
    assert worker.returncode == 0, output.decode(errors="replace")[-3000:]
    assert b"screening worker on" in output
