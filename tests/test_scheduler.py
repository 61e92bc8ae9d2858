"""Stored instances become jobs through the change log, by the manifests' rules."""

from __future__ import annotations

from pacs.archive import Archive, Origin
from pacs.jobs import JobQueue, JobState
from scripts.synthetic_corpus import Patient, Rng, chest_dx, ct_series, mammography
from tests.support.instances import source
from tests.support.pipeline import scheduling
from tests.support.zoo import ZOO

PATIENT = Patient("SCH", "Sched^Uler", "ISO_IR 192", "19700101", "O")


def test_instances_and_studies_are_queued(archive: Archive) -> None:
    queue = JobQueue(archive.index)
    follower = scheduling(archive, lambda: ZOO, stable_seconds=60)
    frontal, lateral = chest_dx(Rng(1), PATIENT, 0.05, "20260101", "S1")
    views = mammography(Rng(2), PATIENT, 0.02, "20260101", "S2")
    ct = ct_series(Rng(3), PATIENT, 1, "20260101", "S3")
    for ds in [frontal, lateral, *views, *ct]:
        archive.ingest(source(ds), Origin.DIMSE)
    assert queue.jobs() == []  # made by the scheduler following the log, not by ingest
    follower.catch_up()
    jobs = {(j.model, j.SOPInstanceUID or j.StudyInstanceUID): j for j in queue.jobs()}
    assert jobs[("cxr-densenet121", frontal.SOPInstanceUID)].state == JobState.PENDING
    skipped = jobs[("cxr-densenet121", lateral.SOPInstanceUID)]
    assert skipped.state == JobState.SKIPPED
    assert skipped.reason == "ViewPosition LL is not one of PA, AP"
    study_job = jobs[("mammo-efficientnet-b0", views[0].StudyInstanceUID)]
    assert study_job.state == JobState.PENDING
    assert study_job.SOPInstanceUID == ""
    assert len(queue.jobs()) == 3  # nothing for the CT
    assert queue.claim("w", models=["mammo-efficientnet-b0"]) is None  # not stable yet
