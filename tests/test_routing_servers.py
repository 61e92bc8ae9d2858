"""A hospital archive routing everything it receives to two central archives, one by
C-STORE and one by STOW-RS: three ``filmless serve`` processes on loopback.

The hospital is killed (``kill -9`` of its whole process group, DIMSE workers
included) five times while it sends, and the STOW-RS central is down for the first
part of the run. Every instance the hospital acknowledged ends up in both centrals
exactly once, the same pixel data under the same UIDs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from pacs.dimse.server import DimseConfig
from pacs.index import Index
from pacs.jobs import JobQueue, JobState
from tests.support.instances import ct_instance
from tests.support.scu import associate, store
from tests.support.server import Server

pytestmark = pytest.mark.slow

STUDIES, PER_STUDY, KILLS = 5, 6, 5
WAIT_S = 180  # bound on the centrals catching up; reached only when something is lost


def _studies() -> list[list[Dataset]]:
    studies = []
    for s in range(STUDIES):
        first = ct_instance(patient_id=f"R{s}", seed=100 * s)
        series = [first]
        for n in range(1, PER_STUDY):
            ds = ct_instance(
                study=first.StudyInstanceUID,
                series=first.SeriesInstanceUID,
                patient_id=f"R{s}",
                seed=100 * s + n,
            )
            ds.InstanceNumber = n + 1
            series.append(ds)
        studies.append(series)
    return studies


def _received(data_dir: Path) -> dict[str, Path]:
    index = Index(f"sqlite:///{data_dir / 'index.sqlite'}")
    try:
        return {r.SOPInstanceUID: data_dir / "objects" / r.path for r in index.instances()}
    finally:
        index.dispose()


def _unsent(data_dir: Path) -> int:
    index = Index(f"sqlite:///{data_dir / 'index.sqlite'}")
    try:
        return sum(j.state in (JobState.PENDING, JobState.RUNNING) for j in JobQueue(index).jobs())
    finally:
        index.dispose()


def test_a_hospital_fills_two_central_archives_through_kills_and_an_outage(
    tmp_path: Path,
) -> None:
    quiet = {"FILMLESS_SCREENING": "false"}
    by_dimse = Server(tmp_path / "central-dimse", FILMLESS_AE_TITLE="CENTRAL", **quiet)
    by_web = Server(tmp_path / "central-web", **quiet)
    routes = {
        "dimse": {"destination": f"CENTRAL@127.0.0.1:{by_dimse.port}", "retry_seconds": 0.2},
        "web": {"destination": by_web.url, "retry_seconds": 0.2, "max_concurrent": 1},
    }
    hospital = Server(
        tmp_path / "hospital",
        FILMLESS_ROUTES=json.dumps(routes),
        FILMLESS_JOB_MAX_ATTEMPTS="30",
        **quiet,
    )
    acknowledged: dict[str, Dataset] = {}
    unsent: list[int] = []
    by_dimse.start()
    hospital.start()
    try:
        for number, study in enumerate(_studies()):
            called = DimseConfig(ae_title="FILMLESS", port=hospital.port)
            assoc = associate(called, [(CTImageStorage, [ExplicitVRLittleEndian])])
            assert assoc.is_established
            for ds in study:
                if store(assoc, ds).Status == 0:
                    acknowledged[str(ds.SOPInstanceUID)] = ds
            assoc.release()
            if number < KILLS:
                hospital.kill(whole_group=True)  # while it routes what it just took
                unsent.append(_unsent(tmp_path / "hospital"))
                hospital.start()
            if number == 2:
                by_web.start()  # down until here: its sends waited in the queue
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            dimse, web = _received(tmp_path / "central-dimse"), _received(tmp_path / "central-web")
            if set(acknowledged) <= set(dimse) and set(acknowledged) <= set(web):
                break
            time.sleep(0.5)
    finally:
        for server in (hospital, by_dimse, by_web):
            if server.process is not None and server.process.poll() is None:
                assert server.stop() == 0, server.output.decode(errors="replace")[-3000:]
    assert len(acknowledged) == STUDIES * PER_STUDY
    # The kills met sends still to do: at least those of the studies before, to the
    # central that was still down.
    assert all(n > 0 for n in unsent[1:3]), unsent
    for central in ("central-dimse", "central-web"):
        received = _received(tmp_path / central)
        # Exactly once: one row per SOP Instance UID, and nothing the hospital did not hold.
        assert set(received) == set(acknowledged), central
        for uid, path in received.items():
            got, sent = pydicom.dcmread(path), acknowledged[uid]
            assert got.PixelData == sent.PixelData
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"):
                assert got[keyword].value == sent[keyword].value
