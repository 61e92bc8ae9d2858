"""The change log: a row per change in the change's own transaction, consumers that
follow it with durable cursors, and ``GET /changes`` for outside systems.

What must hold is Orthanc's change log contract with dcm4chee's export durability: a
change is in the log exactly when it committed, and whatever follows from it (screening
jobs) is done once even when a process dies between the commit and that work.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import Connection, text

from dicomweb.app import create_app
from dicomweb.auth import ApiToken, digest
from inference.scheduler import Scheduler
from models.manifest import Manifest
from pacs.archive import Archive, Origin
from pacs.audit import AuditTrail
from pacs.changes import Change, ChangeKind, ChangeLog, Follower, StudyStability, Writes
from pacs.errors import IndexFailure, PatientConflict
from pacs.index import Index
from pacs.jobs import JobQueue, JobState
from scripts.synthetic_corpus import Patient, Rng, chest_dx
from tests.conftest import make_archive
from tests.support.instances import ct_instance, part10, source
from tests.support.pipeline import scheduling
from tests.support.web import serving
from tests.support.zoo import ZOO

PATIENT = Patient("CHG", "Change^Log", "ISO_IR 192", "19700101", "F")
WAIT_S = 60  # bound on a background thread catching up; never reached when all is well


def _kinds(log: ChangeLog) -> list[tuple[ChangeKind, str]]:
    return [(c.kind, c.SOPInstanceUID) for c in log.since(0, 1000)]


def test_each_change_is_logged_once_with_what_a_consumer_needs(
    tmp_path: Path, index: Index
) -> None:
    archive = make_archive(tmp_path / "data", index, policy="overwrite")
    log = ChangeLog(index)
    first = ct_instance(patient_id="P1")
    archive.ingest(source(first), Origin.DIMSE, SourceApplicationEntityTitle="CT1")
    archive.ingest(source(first), Origin.DIMSE)  # the same bytes: nothing changed
    first.SeriesDescription = "corrected"
    archive.ingest(source(first), Origin.STOW)  # other content, policy overwrite
    other = ct_instance(study=first.StudyInstanceUID, patient_id="P1", seed=2)
    archive.ingest(source(other), Origin.IMPORT)
    refused = ct_instance(study=first.StudyInstanceUID, patient_id="SOMEONE-ELSE")
    with pytest.raises(PatientConflict):
        archive.ingest(source(refused), Origin.DIMSE)
    archive.delete(first.StudyInstanceUID)
    assert _kinds(log)[:3] == [
        (ChangeKind.STORED, first.SOPInstanceUID),
        (ChangeKind.REPLACED, first.SOPInstanceUID),
        (ChangeKind.STORED, other.SOPInstanceUID),
    ]
    assert {k for k, _ in _kinds(log)[3:]} == {ChangeKind.DELETED}
    assert {uid for _, uid in _kinds(log)[3:]} == {first.SOPInstanceUID, other.SOPInstanceUID}
    changes = log.since(0, 1000)
    assert [c.seq for c in changes] == sorted({c.seq for c in changes})  # strictly rising
    stored = changes[0]
    assert stored.StudyInstanceUID == first.StudyInstanceUID
    assert stored.SeriesInstanceUID == first.SeriesInstanceUID
    assert stored.SOPClassUID == first.SOPClassUID
    assert (stored.origin, stored.SourceApplicationEntityTitle) == ("dimse", "CT1")
    assert changes[1].origin == "stow"
    assert log.last() == changes[-1].seq
    assert [c.seq for c in log.since(changes[1].seq, 2)] == [c.seq for c in changes[2:4]]


def test_a_change_that_cannot_be_logged_is_not_stored(archive: Archive) -> None:
    """The row and the change commit together: if the log refuses, so does the store."""
    with archive.index.writer.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER full_log BEFORE INSERT ON change "
            "BEGIN SELECT RAISE(ABORT, 'the log is full'); END"
        )
    ds = ct_instance()
    with pytest.raises(IndexFailure, match="the log is full"):
        archive.ingest(source(ds), Origin.DIMSE)
    assert archive.index.instances() == []
    assert list(archive.store.listing()) == []
    assert ChangeLog(archive.index).last() == 0


def test_an_index_of_the_previous_schema_gains_the_log(tmp_path: Path) -> None:
    """Version 2 had no change log: the tables are added in place, nothing is lost."""
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    index.create_schema()
    archive = make_archive(tmp_path / "data", index)
    ds = ct_instance()
    archive.ingest(source(ds), Origin.DIMSE)
    with index.writer.begin() as conn:
        conn.exec_driver_sql("DROP TABLE change")
        conn.exec_driver_sql("DROP TABLE change_cursor")
        conn.exec_driver_sql("UPDATE filmless_schema SET version = 2")
    index.dispose()
    upgraded = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    upgraded.create_schema()
    assert upgraded.schema_version() == 3
    assert [r.SOPInstanceUID for r in upgraded.instances()] == [ds.SOPInstanceUID]
    assert ChangeLog(upgraded).last() == 0
    upgraded.dispose()


class Recorder:
    """A consumer that writes each change it is given into a table keyed by ``seq``:
    a change committed twice would break the key."""

    name = "recorder"

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.committed_batches = 0

    def prepare(self, changes: Sequence[Change]) -> Writes | None:
        if self.fail_first > 0:
            self.fail_first -= 1
            raise RuntimeError("the destination is not there yet")
        seqs = [c.seq for c in changes]

        def writes(conn: Connection) -> None:
            for seq in seqs:
                conn.execute(text("INSERT INTO seen (seq) VALUES (:seq)"), {"seq": seq})

        return writes

    def committed(self) -> None:
        self.committed_batches += 1


def _seen(index: Index) -> list[int]:
    with index.reading() as conn:
        return [int(s) for s in conn.execute(text("SELECT seq FROM seen ORDER BY seq")).scalars()]


def _make_seen(index: Index) -> None:
    with index.writer.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE seen (seq BIGINT PRIMARY KEY)")


def test_followers_of_one_consumer_do_each_change_once(tmp_path: Path, index: Index) -> None:
    """Several followers of one cursor (threads here, nodes in a cluster): each batch
    commits with the cursor move, so a batch another follower finished is dropped."""
    _make_seen(index)
    archive = make_archive(tmp_path / "data", index)
    log = ChangeLog(index)
    for n in range(30):
        archive.ingest(source(ct_instance(seed=n)), Origin.DIMSE)
    followers = [Follower(log, Recorder(), batch=4) for _ in range(3)]
    stop = threading.Event()
    threads = [f.start(stop) for f in followers]
    deadline = time.monotonic() + WAIT_S
    while log.cursor("recorder") < log.last() and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(timeout=WAIT_S)
    assert _seen(index) == [c.seq for c in log.since(0, 1000)]
    assert log.cursor("recorder") == log.last()


def test_a_failing_consumer_keeps_its_place_and_is_retried(
    archive: Archive, caplog: pytest.LogCaptureFixture
) -> None:
    _make_seen(archive.index)
    log = ChangeLog(archive.index)
    archive.ingest(source(ct_instance()), Origin.DIMSE)
    recorder = Recorder(fail_first=2)
    follower = Follower(log, recorder, poll=0.01)
    with pytest.raises(RuntimeError):
        follower.step()
    assert log.cursor("recorder") == 0
    stop = threading.Event()
    with caplog.at_level(logging.WARNING, logger="pacs.changes"):
        thread = follower.start(stop)
        deadline = time.monotonic() + WAIT_S
        while not _seen(archive.index) and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        thread.join(timeout=WAIT_S)
    assert _seen(archive.index) == [log.last()]
    assert recorder.committed_batches == 1
    assert "recorder: changes after #0 wait" in caplog.text
    assert "the destination is not there yet" in caplog.text


def _frontal(seed: int) -> tuple[Dataset, str]:
    frontal, _ = chest_dx(Rng(seed), PATIENT, 0.05, "20260101", f"C{seed}")
    return frontal, str(frontal.SOPInstanceUID)


class FailingOnce:
    """Manifests whose first reading fails, as a routing error after the commit would."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> Sequence[Manifest]:
        self.calls += 1
        if self.calls == 1:
            raise OSError("the models folder could not be read")
        return ZOO


def test_routing_that_fails_after_the_commit_still_makes_the_job(archive: Archive) -> None:
    """Before the change log, an exception while routing was logged and the job never
    existed. Now the change stays unconsumed and the job is made on the next try."""
    queue = JobQueue(archive.index)
    follower = scheduling(archive, lambda: ZOO)
    follower.consumer = Scheduler(archive.index, FailingOnce(), stable_seconds=0)
    frontal, sop = _frontal(1)
    archive.ingest(source(frontal), Origin.DIMSE)  # Success: committed
    with pytest.raises(OSError, match="models folder"):
        follower.step()
    assert queue.jobs() == []
    follower.catch_up()
    (job,) = queue.jobs()
    assert (job.model, job.SOPInstanceUID, job.state) == ("cxr-densenet121", sop, JobState.PENDING)
    follower.catch_up()  # nothing left: the job is not made again
    assert len(queue.jobs()) == 1


_INGEST_THEN_DIE = """
import os, signal, sys
from pathlib import Path
from pacs.archive import Archive, InstanceSource, Origin
from pacs.index import Index
from pacs.store import FsBlobStore

index = Index(sys.argv[1])
archive = Archive(FsBlobStore(Path(sys.argv[2])), index)
for path in sys.argv[3:]:
    with open(path, "rb") as stream:
        archive.ingest(InstanceSource.from_part10(stream), Origin.DIMSE)
os.kill(os.getpid(), signal.SIGKILL)  # committed, and not a line of routing ran
"""

_DIE_WHILE_ROUTING = """
import os, signal, sys
from pacs.changes import ChangeLog, Follower
from inference.scheduler import Scheduler
from pacs.index import Index
from tests.support.zoo import ZOO

index = Index(sys.argv[1])


class Dying(Scheduler):
    def prepare(self, changes):
        writes = super().prepare(changes)

        def die(conn):
            writes(conn)  # the jobs are written, the cursor moved, nothing committed
            os.kill(os.getpid(), signal.SIGKILL)

        return die


Follower(ChangeLog(index), Dying(index, lambda: ZOO, stable_seconds=0)).step()
"""


def _python(script: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )


def test_kill_9_between_the_commit_and_the_jobs_loses_none(
    tmp_path: Path, archive: Archive
) -> None:
    """A process killed right after its commits, then one killed inside the scheduler's
    transaction: the next follower makes every job, once."""
    queue = JobQueue(archive.index)
    follower = scheduling(archive, lambda: ZOO)
    files, sops = [], []
    for seed in range(3):
        frontal, sop = _frontal(10 + seed)
        path = tmp_path / f"{sop}.dcm"
        path.write_bytes(part10(frontal))
        files.append(str(path))
        sops.append(sop)
    url = archive.index.url.render_as_string(hide_password=False)
    died = _python(_INGEST_THEN_DIE, url, str(archive.store.root), *files)
    assert died.returncode == -signal.SIGKILL, died.stderr.decode(errors="replace")
    assert {r.SOPInstanceUID for r in archive.index.instances()} == set(sops)
    died = _python(_DIE_WHILE_ROUTING, url)
    assert died.returncode == -signal.SIGKILL, died.stderr.decode(errors="replace")
    assert queue.jobs() == []  # its transaction never committed
    assert follower.log.cursor(Scheduler.name) == 0
    follower.catch_up()
    assert sorted(j.SOPInstanceUID for j in queue.jobs()) == sorted(sops)
    assert {j.state for j in queue.jobs()} == {JobState.PENDING}
    assert follower.log.cursor(Scheduler.name) == follower.log.last()


def test_a_scheduler_started_later_leaves_earlier_instances_to_backfill(
    archive: Archive,
) -> None:
    """Screening switched on for an archive that holds studies: what arrives from then
    on is screened; what was there is `filmless jobs backfill`'s, as before the log."""
    before, _ = _frontal(20)
    archive.ingest(source(before), Origin.DIMSE)
    follower = scheduling(archive, lambda: ZOO)
    after, sop = _frontal(21)
    archive.ingest(source(after), Origin.DIMSE)
    follower.catch_up()
    assert [j.SOPInstanceUID for j in JobQueue(archive.index).jobs()] == [sop]


def test_changes_over_http(archive: Archive, tmp_path: Path) -> None:
    read, weak = "read-token", "no-token"
    archive.audit = AuditTrail(tmp_path / "audit.jsonl")
    app = create_app(archive, api_tokens=[ApiToken("ris", "read", digest(read))])
    stored = [ct_instance(seed=n) for n in range(5)]
    for ds in stored:
        archive.ingest(source(ds), Origin.DIMSE)
    archive.delete_instance(stored[0].SOPInstanceUID)
    with serving(app) as url:
        root = url.removesuffix("/dicom-web")
        auth = {"Authorization": f"Bearer {read}"}
        with httpx.Client(base_url=root, timeout=30) as client:
            assert client.get("/changes").status_code == 401
            bad = {"Authorization": f"Bearer {weak}"}
            assert client.get("/changes", headers=bad).status_code == 401
            seen: list[dict[str, object]] = []
            since = 0
            while True:
                page = client.get(f"/changes?since={since}&limit=2", headers=auth)
                assert page.status_code == 200, page.text
                body = page.json()
                seen += body["changes"]
                since = body["last"]
                if body["done"]:
                    break
            assert [c["SOPInstanceUID"] for c in seen] == [
                *(str(ds.SOPInstanceUID) for ds in stored),
                str(stored[0].SOPInstanceUID),
            ]
            assert [c["kind"] for c in seen] == ["stored"] * 5 + ["deleted"]
            assert seen[0]["StudyInstanceUID"] == stored[0].StudyInstanceUID
            assert since == seen[-1]["seq"]
            empty = client.get(f"/changes?since={since}", headers=auth).json()
            assert empty == {"changes": [], "last": since, "done": True}
            for query in ("since=-1", "limit=0", "limit=10001", "since=x", "since=1&since=2"):
                refused = client.get(f"/changes?{query}", headers=auth)
                assert refused.status_code == 400, query
                assert "must be one whole number" in refused.json()["error"]
    # Reading the feed is a query in the audit trail (PS3.15 A.5.3.10), named by token.
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    feed = [e for e in lines if "/changes" in e["Detail"] and e["Detail"].endswith("-> 200")]
    assert feed
    assert all(e["EventID"]["code"] == "110112" for e in feed)
    assert all(e["ActiveParticipant"]["UserID"] == "ris" for e in feed)


def test_a_study_is_announced_stable_once_it_is_quiet(tmp_path: Path, index: Index) -> None:
    """Decided from the index: the settling studies and their due times are rows, so any
    process or node sweeps them, after any restart, and each quiet spell is announced once."""
    archive = make_archive(tmp_path / "data", index)
    log = ChangeLog(index)
    stability = StudyStability(index, seconds=30)
    follower = Follower(log, stability)
    first, second, gone = ct_instance(), ct_instance(seed=1), ct_instance(seed=2)
    for ds in (first, second, gone):
        archive.ingest(source(ds), Origin.DIMSE)
    archive.delete(gone.StudyInstanceUID)
    follower.catch_up()
    t0 = max(c.time for c in log.since(0, 100))
    assert stability.sweep(t0 + timedelta(seconds=29)) == []
    # Two sweepers at once (two nodes): each study is announced by one of them.
    sweepers = [StudyStability(index, seconds=30) for _ in range(2)]
    announced: list[str] = []
    threads = [
        threading.Thread(target=lambda s=s: announced.extend(s.sweep(t0 + timedelta(seconds=31))))
        for s in sweepers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_S)
    assert sorted(announced) == sorted([first.StudyInstanceUID, second.StudyInstanceUID])
    stable = [c for c in log.since(0, 100) if c.kind == ChangeKind.STABLE]
    assert sorted(c.StudyInstanceUID for c in stable) == sorted(announced)
    assert stability.sweep(t0 + timedelta(hours=1)) == []
    # Another image: the study settles again, and is announced again once quiet again.
    archive.ingest(source(ct_instance(study=first.StudyInstanceUID, seed=3)), Origin.DIMSE)
    follower.catch_up()  # its own "stable" changes settle nothing
    later = log.since(0, 100)[-1].time
    assert stability.sweep(later + timedelta(seconds=29)) == []
    assert stability.sweep(later + timedelta(seconds=30)) == [first.StudyInstanceUID]
