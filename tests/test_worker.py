"""End to end in one process: stored images -> jobs -> ONNX Runtime -> SR in the same study."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ParametricMapStorage as ParametricMap

import inference.heatmap as heatmap_module
import inference.worker as worker_module
from dicomweb.app import create_app
from inference.worker import Worker, WorkerSettings
from models.store import ModelStore
from models.zoo import CHEST_XRAY
from pacs.archive import Archive, Origin
from pacs.audit import AuditTrail
from pacs.dimse.server import DimseConfig, start_dimse
from pacs.forward import destination
from pacs.index import Index
from pacs.jobs import JobQueue, JobState
from scripts.synthetic_corpus import Patient, Rng, chest_dx, mammography
from tests.conftest import free_port, make_archive
from tests.support.instances import source
from tests.support.pipeline import drain, pipeline, scheduling
from tests.support.web import serving

PATIENT = Patient("E2E", "End^To End", "ISO_IR 192", "19700101", "O")


@pytest.fixture(scope="module")
def models_dir(demo_models: Path) -> Path:
    return demo_models


@pytest.mark.slow
def test_chest_xray_gets_an_sr_and_a_rerun_replaces_it(
    archive: Archive, models_dir: Path, tmp_path: Path
) -> None:
    archive.audit = AuditTrail(tmp_path / "audit.jsonl")
    queue, worker = pipeline(archive, models_dir)
    frontal, lateral = chest_dx(Rng(11), PATIENT, 0.05, "20260101", "E1")
    for ds in (frontal, lateral):
        archive.ingest(source(ds), Origin.DIMSE)
    drain(worker)
    jobs = {j.SOPInstanceUID: j for j in queue.jobs()}
    done = jobs[frontal.SOPInstanceUID]
    assert done.state == JobState.DONE
    assert jobs[lateral.SOPInstanceUID].state == JobState.SKIPPED
    reports = [
        r
        for r in archive.index.records(frontal.StudyInstanceUID)
        if r.SOPInstanceUID == done.result
    ]
    assert len(reports) == 1
    with archive.open(reports[0]) as stream:
        sr = pydicom.dcmread(stream)
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == frontal.StudyInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert evidence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == frontal.SOPInstanceUID
    # The heatmaps of the most probable positive findings, in their own series, each
    # listed in the report's evidence (PS3.3 C.17.2.3).
    maps = _maps(archive, frontal.StudyInstanceUID)
    assert 1 <= len(maps) <= CHEST_XRAY.parametric_maps
    assert len({r.SeriesInstanceUID for r in maps}) == 1
    listed = {i.ReferencedSOPInstanceUID for s in evidence for i in s.ReferencedSOPSequence}
    assert {r.SOPInstanceUID for r in maps} <= listed
    # Asked again (same instance stored anew): one report, replaced, not a second one,
    # and the same maps.
    queue.enqueue(CHEST_XRAY.name, frontal.StudyInstanceUID, frontal.SOPInstanceUID)
    drain(worker)
    in_study = archive.index.records(frontal.StudyInstanceUID)
    assert len(in_study) == 3 + len(maps)  # two images, one report and its maps
    assert queue.jobs(JobState.DONE)[0].result == done.result
    assert [r.SOPInstanceUID for r in _maps(archive, frontal.StudyInstanceUID)] == [
        r.SOPInstanceUID for r in maps
    ]
    # Each report stored is audited, naming the screening that wrote it (PS3.15 A.5).
    audited = [
        json.loads(line)
        for line in (tmp_path / "audit.jsonl").read_text().splitlines()
        if "filmless screening" in line
    ]
    assert len(audited) == 2
    assert audited[0]["ParticipantObject"]["StudyInstanceUID"] == frontal.StudyInstanceUID
    assert done.result in audited[0]["Detail"]
    worker.close()


def _maps(archive: Archive, StudyInstanceUID: str) -> list[Any]:
    return sorted(
        (r for r in archive.index.records(StudyInstanceUID) if r.SOPClassUID == ParametricMap),
        key=lambda r: r.SOPInstanceUID,
    )


@pytest.mark.slow
def test_a_rerun_with_fewer_positive_findings_drops_the_maps_it_no_longer_makes(
    archive: Archive, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue, worker = pipeline(archive, models_dir)
    frontal, _ = chest_dx(Rng(12), PATIENT, 0.05, "20260101", "E2")
    archive.ingest(source(frontal), Origin.DIMSE)
    drain(worker)
    before = _maps(archive, frontal.StudyInstanceUID)
    assert len(before) >= 2
    # The same job again, now with one positive finding mapped.
    made = heatmap_module.heatmaps
    monkeypatch.setattr(worker_module, "heatmaps", lambda *a: made(*a)[:1])
    queue.enqueue(CHEST_XRAY.name, frontal.StudyInstanceUID, frontal.SOPInstanceUID)
    drain(worker)
    after = _maps(archive, frontal.StudyInstanceUID)
    assert len(after) == 1
    assert after[0].SOPInstanceUID in {r.SOPInstanceUID for r in before}
    worker.close()


@pytest.mark.slow
def test_a_study_deleted_while_its_report_is_written_stays_deleted(
    archive: Archive, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DELETE arrives after the model ran and before the report is stored: the report is
    dropped (the job says why), and nothing of the study comes back."""
    queue, worker = pipeline(archive, models_dir)
    frontal, _ = chest_dx(Rng(21), PATIENT, 0.05, "20260101", "DEL")
    archive.ingest(source(frontal), Origin.DIMSE)
    writer = worker.writer(
        next(
            m.manifest
            for m in ModelStore(models_dir).installed()
            if m.manifest.name == CHEST_XRAY.name
        )
    )
    written = writer.write

    def write_then_delete(*args: Any, **kwargs: Any) -> Any:
        report = written(*args, **kwargs)
        archive.delete(frontal.StudyInstanceUID)
        return report

    monkeypatch.setattr(writer, "write", write_then_delete)
    drain(worker)
    (job,) = queue.jobs()
    assert job.state == JobState.SKIPPED
    assert "the report was dropped" in job.reason
    assert archive.index.records(frontal.StudyInstanceUID) == []
    assert archive.index.instances() == []
    worker.close()


@pytest.mark.slow
def test_mammography_exam_after_all_four_views(archive: Archive, models_dir: Path) -> None:
    queue, worker = pipeline(archive, models_dir)
    views = mammography(Rng(12), PATIENT, 0.02, "20260101", "E2")
    archive.ingest(source(views[0]), Origin.DIMSE)
    drain(worker)
    (early,) = queue.jobs()
    assert early.state == JobState.SKIPPED
    assert early.reason.startswith("views missing from the study")
    for ds in views[1:]:
        archive.ingest(source(ds), Origin.DIMSE)
    drain(worker)
    (job,) = queue.jobs()
    assert job.state == JobState.DONE, job.reason
    (report,) = [
        r
        for r in archive.index.records(views[0].StudyInstanceUID)
        if r.SOPInstanceUID == job.result
    ]
    with archive.open(report) as stream:
        sr = pydicom.dcmread(stream)
    identifiers = {
        str(item.TextValue)
        for group in sr.ContentSequence
        for item in group.get("ContentSequence", [])
        for item in item.get("ContentSequence", [])
        if item.ValueType == "TEXT"
        and "ConceptNameCodeSequence" in item
        and item.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"
    }
    assert {"malignancy L", "malignancy R", "malignancy exam", "density A"} <= identifiers
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert len(evidence) == 4
    worker.close()


def test_a_rule_on_any_stored_attribute_is_decided_alike_when_queued_and_when_run(
    archive: Archive, models_dir: Path, tmp_path: Path
) -> None:
    """A mammography manifest that also asks for BodyPartExamined BREAST: the scheduler
    queues the study and the worker then finds its four views usable (it used to re-check
    five keywords of its own, see every view as unusable and skip the study)."""
    models = tmp_path / "models"
    shutil.copytree(models_dir / "mammo-efficientnet-b0", models / "mammo-efficientnet-b0")
    manifest = models / "mammo-efficientnet-b0" / "manifest.toml"
    text = manifest.read_text()
    assert "[routing.match]\n" in text
    manifest.write_text(
        text.replace("[routing.match]\n", '[routing.match]\nBodyPartExamined = ["BREAST"]\n')
    )
    queue, worker = pipeline(archive, models)
    views = mammography(Rng(13), PATIENT, 0.02, "20260101", "E3")
    for ds in views:
        archive.ingest(source(ds), Origin.DIMSE)
    drain(worker)
    (job,) = queue.jobs()
    assert job.state == JobState.DONE, job.reason
    worker.close()


@pytest.mark.slow
def test_reports_are_forwarded_by_c_store_and_stow(
    archive: Archive, models_dir: Path, tmp_path: Path
) -> None:
    """Two peers receive the report (another filmless, over DIMSE and over DICOMweb); a
    peer that is down leaves a failed forwarding job with the reason, not a lost report."""
    index = Index(f"sqlite:///{tmp_path / 'peer.sqlite'}")
    index.create_schema()
    peer = make_archive(tmp_path / "peer", index)
    config = DimseConfig(ae_title="PEER", port=free_port())
    dimse = start_dimse(peer, config)
    try:
        with serving(create_app(peer)) as url:
            store = ModelStore(models_dir)
            queue = JobQueue(archive.index)
            follower = scheduling(archive, lambda: [m.manifest for m in store.installed()])
            archive.events.subscribe(follower.catch_up)
            targets = (
                destination("pacs", f"PEER@127.0.0.1:{config.port}"),
                destination("cloud", url),
                destination("down", f"NOBODY@127.0.0.1:{free_port()}"),
            )
            worker = Worker(
                archive,
                queue,
                store,
                name="w1",
                settings=WorkerSettings(destinations=targets, max_attempts=1),
            )
            frontal, _ = chest_dx(Rng(13), PATIENT, 0.05, "20260101", "E3")
            archive.ingest(source(frontal), Origin.DIMSE)
            drain(worker)
            worker.close()
    finally:
        dimse.shutdown()
    jobs = {j.model: j for j in queue.jobs()}
    report = jobs[CHEST_XRAY.name].result
    assert jobs["forward:pacs"].state == JobState.DONE
    assert jobs["forward:cloud"].state == JobState.DONE
    assert jobs["forward:down"].state == JobState.FAILED
    assert "cannot be reached" in jobs["forward:down"].reason
    (received,) = peer.index.records(frontal.StudyInstanceUID)  # both sends, one instance
    assert received.SOPInstanceUID == report
    (ours,) = [
        r for r in archive.index.records(frontal.StudyInstanceUID) if r.SOPInstanceUID == report
    ]
    with archive.open(ours) as mine, peer.open(received) as theirs:
        assert pydicom.dcmread(mine) == pydicom.dcmread(theirs)
    index.dispose()
