"""Routing rules: what goes to which other archive, queued from the change log and sent
by C-STORE or STOW-RS to real peers (another filmless archive on loopback)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydicom.uid import RLELossless

from dicomweb.app import create_app
from dicomweb.auth import ApiToken, digest
from filmless.cli import main
from filmless.settings import load_settings
from filmless.wiring import build_archive
from pacs.archive import Archive, Origin
from pacs.changes import ChangeLog, Follower, StudyStability
from pacs.dimse.server import DimseConfig, start_dimse
from pacs.forward import destination
from pacs.index import Index
from pacs.jobs import JobKind, JobQueue, JobState
from pacs.router import Routed, Router, Senders, job_model
from pacs.routes import check_route, matches
from tests.conftest import free_port, make_archive
from tests.support.instances import ct_instance, source
from tests.support.web import serving

VALUES = {
    "Modality": "CT",
    "StudyDate": "20260315",
    "ImageType": "ORIGINAL\\PRIMARY\\AXIAL",
    "StationName": "CT-ROOM-2",
    "BodyPartExamined": None,
    "SourceApplicationEntityTitle": "CT1",
    "origin": "dimse",
}


@pytest.mark.parametrize(
    ("match", "wanted"),
    [
        ({}, True),
        ({"Modality": ["CT"]}, True),
        ({"Modality": ["MR", "CT"]}, True),  # one of several values (PS3.4 C.2.2.2.1)
        ({"Modality": ["MR"]}, False),
        ({"Modality": ["ct"]}, False),  # case-sensitive, as a C-FIND key on CS
        ({"StationName": ["CT-*"]}, True),  # wildcards (C.2.2.2.4)
        ({"StationName": ["CT-ROOM-?"]}, True),
        ({"StationName": ["MR*"]}, False),
        ({"StudyDate": ["20260301-20260331"]}, True),  # a range (C.2.2.2.5)
        ({"StudyDate": ["20260316-"]}, False),
        ({"StudyDate": ["-20260315"]}, True),
        ({"ImageType": ["AXIAL"]}, True),  # any of several stored values
        ({"ImageType": ["LOCALIZER"]}, False),
        ({"BodyPartExamined": ["CHEST"]}, False),  # absent matches only ""
        ({"BodyPartExamined": [""]}, True),
        ({"SourceApplicationEntityTitle": ["CT1"], "origin": ["dimse"]}, True),
        ({"origin": ["inference"]}, False),  # "is an AI report"
        ({"Modality": ["CT"], "StationName": ["MR*"]}, False),  # every key must match
    ],
)
def test_a_rule_matches_as_a_c_find_key_would(match: dict[str, list[str]], wanted: bool) -> None:
    assert matches(check_route("central", match), VALUES) is wanted


def test_malformed_rules_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a DICOM keyword"):
        check_route("central", {"Modalty": ["CT"]})
    with pytest.raises(ValueError, match="lists no value"):
        check_route("central", {"Modality": []})
    with pytest.raises(ValidationError, match="neither AE@host:port nor an http"):
        load_settings(data_dir=tmp_path, routes={"central": {"destination": "nowhere"}})
    with pytest.raises(ValidationError, match="a token is for a DICOMweb server"):
        load_settings(
            data_dir=tmp_path,
            routes={"central": {"destination": "CENTRAL@127.0.0.1:104", "token": "t"}},
        )
    with pytest.raises(ValidationError, match="trigger"):
        load_settings(
            data_dir=tmp_path,
            routes={"central": {"destination": "http://x/dicom-web", "trigger": "daily"}},
        )


class Peer:
    """Another filmless archive, over DIMSE and DICOMweb (with a write token)."""

    TOKEN = "central-write-token"

    def __init__(self, root: Path) -> None:
        self.index = Index(f"sqlite:///{root / 'peer.sqlite'}")
        self.index.create_schema()
        self.archive = make_archive(root / "peer", self.index)
        self.config = DimseConfig(ae_title="CENTRAL", port=free_port())

    @property
    def ae(self) -> str:
        return f"CENTRAL@127.0.0.1:{self.config.port}"

    def received(self) -> set[str]:
        return {r.SOPInstanceUID for r in self.index.instances()}


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[tuple[Peer, str]]:
    peer = Peer(tmp_path)
    dimse = start_dimse(peer.archive, peer.config)
    app = create_app(peer.archive, api_tokens=[ApiToken("hospital", "write", digest(Peer.TOKEN))])
    try:
        with serving(app) as url:
            yield peer, url
    finally:
        dimse.shutdown()
        peer.index.dispose()


def _drain(follower: Follower, senders: Senders, names: list[str]) -> None:
    """Queue from the log, then send until nothing is due (failures wait for retry)."""
    follower.catch_up()
    while any(senders.run_once(name) for name in names):
        pass


def test_instances_reach_the_peer_by_c_store_and_stow_rs(
    archive: Archive, peer: tuple[Peer, str]
) -> None:
    central, url = peer
    routes = [
        Routed(check_route("ct", {"Modality": ["CT"]}), destination("ct", central.ae)),
        Routed(
            check_route("web", {"StationName": ["WARD-*"]}, "stable"),
            destination("web", url, Peer.TOKEN),
        ),
    ]
    log = ChangeLog(archive.index)
    log.begin("routes")
    follower = Follower(log, Router(archive.index, routes))
    senders = Senders(archive, routes, ae_title="HOSPITAL", name="n1", max_attempts=3)
    ct = ct_instance()
    ct.compress(RLELossless)  # sent as stored: compressed
    ward = [ct_instance(modality="DX", seed=n) for n in range(2)]
    for ds in ward:
        ds.StationName = "WARD-4"
        ds.StudyInstanceUID = ward[0].StudyInstanceUID
    other = ct_instance(modality="MR")
    for ds in (ct, *ward, other):
        archive.ingest(source(ds), Origin.DIMSE, SourceApplicationEntityTitle="CT1")
    _drain(follower, senders, ["ct", "web"])
    assert central.received() == {ct.SOPInstanceUID}  # the ward study is not stable yet
    (sent,) = central.index.instances()
    assert sent.TransferSyntaxUID == RLELossless
    with (
        archive.open(archive.records(ct.StudyInstanceUID)[0]) as mine,
        central.archive.open(sent) as theirs,
    ):
        assert theirs.read() == mine.read()  # the file as stored
    stability = StudyStability(archive.index, seconds=0)
    Follower(log, stability).catch_up()
    stability.sweep()
    _drain(follower, senders, ["ct", "web"])
    assert central.received() == {ct.SOPInstanceUID, *(ds.SOPInstanceUID for ds in ward)}
    jobs = {j.SOPInstanceUID: j for j in JobQueue(archive.index).jobs()}
    assert {j.model for j in jobs.values()} == {job_model("ct"), job_model("web")}
    assert all(j.state == JobState.DONE for j in jobs.values())


def test_a_peer_that_is_down_keeps_the_sends_until_it_is_back(
    archive: Archive, tmp_path: Path
) -> None:
    central = Peer(tmp_path)
    routes = [Routed(check_route("ct", {}), destination("ct", central.ae), retry_seconds=0.01)]
    log = ChangeLog(archive.index)
    log.begin("routes")
    follower = Follower(log, Router(archive.index, routes))
    senders = Senders(archive, routes, ae_title="HOSPITAL", name="n1", max_attempts=2)
    sent = [ct_instance(seed=n) for n in range(3)]
    for ds in sent:
        ds.StudyInstanceUID = sent[0].StudyInstanceUID
        archive.ingest(source(ds), Origin.DIMSE)
    follower.catch_up()
    queue = JobQueue(archive.index)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        senders.run_once("ct")
        if all(j.state == JobState.FAILED for j in queue.jobs()):
            break
        time.sleep(0.02)
    failed = queue.jobs()
    assert [j.state for j in failed] == [JobState.FAILED] * 3
    assert all("cannot be reached" in j.reason for j in failed)
    dimse = start_dimse(central.archive, central.config)
    try:
        assert queue.requeue(job_model("ct"), [JobState.FAILED]) == 3
        while senders.run_once("ct"):
            pass
    finally:
        dimse.shutdown()
    assert central.received() == {ds.SOPInstanceUID for ds in sent}
    assert all(j.state == JobState.DONE for j in queue.jobs())
    central.index.dispose()


def test_the_instances_of_a_study_are_sent_in_order(index: Index) -> None:
    """One at a time per study: a send waiting to be retried holds back the later
    instances of its study, not those of other studies."""
    queue = JobQueue(index)
    model = job_model("central")
    for sop in ("1.1", "1.2"):
        queue.enqueue(model, "1", sop)
    queue.enqueue(model, "2", "2.1")
    first = queue.claim("a", models=[model], in_study_order=True)
    assert first is not None
    assert first.SOPInstanceUID == "1.1"
    other = queue.claim("b", models=[model], in_study_order=True)
    assert other is not None
    assert other.SOPInstanceUID == "2.1"  # 1.2 waits for 1.1
    assert queue.claim("c", models=[model], in_study_order=True) is None
    queue.fail(first, "peer busy", max_attempts=3, backoff=3600)
    assert queue.claim("c", models=[model], in_study_order=True) is None  # still waits
    assert queue.requeue(model, [JobState.PENDING]) == 2
    again = queue.claim("c", models=[model], in_study_order=True)
    assert again is not None
    assert again.SOPInstanceUID == "1.1"


def test_each_kind_of_job_is_claimed_by_its_own_threads(index: Index) -> None:
    """Screening threads run models and send reports; routing's sends are the senders'."""
    queue = JobQueue(index)
    queue.enqueue(job_model("central"), "1", "1.1")
    queue.enqueue("cxr-densenet121", "1", "1.1")
    queue.enqueue(destination("ris", "RIS@127.0.0.1:104").job_model, "1", "1.2")
    screening = [queue.claim("w", kinds=(JobKind.SCREEN, JobKind.FORWARD)) for _ in range(3)]
    found = {(j.kind, j.name) for j in screening if j is not None}
    assert found == {(JobKind.SCREEN, "cxr-densenet121"), (JobKind.FORWARD, "ris")}
    route = queue.claim("s", kinds=(JobKind.ROUTE,))
    assert route is not None
    assert (route.kind, route.name) == (JobKind.ROUTE, "central")
    assert queue.states(JobKind.ROUTE) == {"central": {JobState.RUNNING: 1}}


def test_runs_of_a_study_stop_at_a_send_that_waits(index: Index) -> None:
    queue = JobQueue(index)
    model = job_model("central")
    for n in range(5):
        queue.enqueue(model, "1", f"1.{n}")
    queue.enqueue(model, "2", "2.0")
    run = queue.claim_run("a", model, limit=3)
    assert [j.SOPInstanceUID for j in run] == ["1.0", "1.1", "1.2"]
    assert queue.claim_run("b", model, limit=3)[0].SOPInstanceUID == "2.0"  # study 1 is held
    assert queue.complete_all(run[:1]) == 1
    queue.fail(run[1], "peer busy", max_attempts=3, backoff=3600)
    queue.release(run[2:])
    assert queue.claim_run("c", model, limit=3) == []  # 1.1 waits, and 1.2 to 1.4 behind it
    released = {j.SOPInstanceUID: j for j in queue.jobs()}["1.2"]
    assert (released.state, released.attempts) == (JobState.PENDING, 0)


def test_concurrent_senders_never_hold_two_runs_of_one_study(index: Index) -> None:
    """Six senders (on PostgreSQL as on separate nodes: each claim is its own connection)
    take runs of three studies at once: at no moment do two hold runs of the same study,
    and each study's instances are done in the order they were queued."""
    queue = JobQueue(index)
    model = job_model("central")
    queued = {study: [f"{study}.{n}" for n in range(40)] for study in ("1", "2", "3")}
    for n in range(40):
        for study, sops in queued.items():
            queue.enqueue(model, study, sops[n])
    guard = threading.Lock()
    holding: dict[str, str] = {}
    done: dict[str, list[str]] = {study: [] for study in queued}
    clashes: list[str] = []

    def sender(name: str) -> None:
        idle = 0
        while idle < 20:
            run = queue.claim_run(name, model, limit=7)
            if not run:
                idle += 1
                time.sleep(0.01)
                continue
            idle = 0
            study = run[0].StudyInstanceUID
            with guard:
                if study in holding:
                    clashes.append(f"{name} and {holding[study]} both hold study {study}")
                holding[study] = name
            time.sleep(0.002)  # the send
            with guard:  # recorded and let go together, as seen by the other senders
                assert queue.complete_all(run) == len(run)
                done[study] += [j.SOPInstanceUID for j in run]
                del holding[study]

    threads = [threading.Thread(target=sender, args=(f"s{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert clashes == []
    assert done == queued


def test_routes_status_and_resend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")  # the table on one line per route
    port = free_port()
    config = tmp_path / "filmless.toml"
    config.write_text(
        f'[routes.central]\ndestination = "CENTRAL@127.0.0.1:{port}"\n'
        'match = { Modality = ["CT"] }\n'
    )
    settings = load_settings(config)
    index = Index(f"sqlite:///{settings.data_dir / 'index.sqlite'}")
    settings.data_dir.mkdir()
    index.create_schema()
    queue = JobQueue(index)
    for n in range(3):
        queue.enqueue(job_model("central"), "1", f"1.{n}")
    job = queue.claim("w", models=[job_model("central")])
    assert job is not None
    queue.fail(job, "CENTRAL@127.0.0.1 cannot be reached", max_attempts=1)
    index.dispose()
    assert main(["--config", str(config), "routes", "status"]) == 0
    shown = capsys.readouterr().err
    assert "central" in shown
    assert "cannot be reached" in shown
    assert main(["--config", str(config), "routes", "resend", "central"]) == 0
    assert "1 send(s) of central queued again" in capsys.readouterr().err
    assert main(["--config", str(config), "routes", "resend", "nowhere"]) == 2


def test_a_route_added_later_backfills_what_was_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Instances stored before the route existed never reached its consumer (it starts
    at the end of the change log); ``routes backfill`` queues them, once."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    config = tmp_path / "filmless.toml"
    config.write_text(
        f'[routes.central]\ndestination = "CENTRAL@127.0.0.1:{free_port()}"\n'
        'match = { Modality = ["CT"] }\n'
    )
    settings = load_settings(config)
    archive = build_archive(settings)
    study = "1.2.826.0.1.3680043.10.1.7"
    cts = [ct_instance(study=study) for _ in range(3)]
    mr = ct_instance(study=study)
    mr.Modality = "MR"
    for ds in [cts[0], mr, *cts[1:]]:
        archive.ingest(source(ds), Origin.DIMSE)
    archive.index.dispose()
    argv = ["--config", str(config), "routes", "backfill", "central"]
    assert main(argv) == 0
    # instances, queued, had a send, not matched
    assert _last_row(capsys.readouterr().err) == ["4", "3", "0", "1"]
    assert main(argv) == 0  # again: nothing twice
    assert _last_row(capsys.readouterr().err) == ["4", "0", "3", "1"]
    assert main([*argv[:-1], "nowhere"]) == 2
    index = Index(settings.index_url)
    queued = [j for j in JobQueue(index).jobs() if j.kind == JobKind.ROUTE]
    index.dispose()
    assert [j.SOPInstanceUID for j in sorted(queued, key=lambda j: j.id)] == [
        ds.SOPInstanceUID for ds in cts
    ]
    assert {j.state for j in queued} == {JobState.PENDING}


def _last_row(table: str) -> list[str]:
    row = [line for line in table.splitlines() if line.startswith("│")][-1]
    return [cell.strip() for cell in row.split("│")[1:-1]]
