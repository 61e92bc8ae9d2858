"""The job loop: claim, read, preprocess, infer, report, store, record the outcome.

Every step that can go wrong ends in the queue: an image a model cannot use is a
skipped job with the reason, an error is a failed attempt (retried with backoff up to
``max_attempts``), and the report goes through :meth:`Archive.ingest` like any other
instance, replacing the report of an earlier run of the same job. Each stored report
becomes a forwarding job per configured destination (:mod:`pacs.forward`).
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from inference.aggregation import aggregate
from inference.disc import optic_disc
from inference.eyes import Ungradable, exam
from inference.geometry import Placement
from inference.heatmap import heatmaps, map_uids, parametric_map, series_uid
from inference.inputs import Input, SharedInputs
from inference.preprocess import Unusable, prepare
from inference.quality import NotAssessable
from inference.readings import (
    SIDES,
    View,
    breast_readings,
    fundus_reading,
    laterality,
    organ_box,
)
from inference.report import (
    UnreportableSource,
    derived_uid,
    findings,
    not_assessable_report,
)
from inference.report_writer import EncodedReport, ReportWriter, encoded
from inference.routing import decide, missing_views, view
from inference.runtime import DEFAULT_PROVIDERS, BatchingSession
from models.manifest import Manifest
from models.store import ModelStore
from models.zoo import EYE_TASKS
from pacs.archive import Archive, InstanceSource, Origin
from pacs.attributes import StoredValues, unpack
from pacs.audit import Actor, AuditEvent, Outcome
from pacs.errors import NotFound, PacsError, SourceGone, UndecodablePixels
from pacs.forward import Destination, send
from pacs.index import InstanceRecord
from pacs.jobs import Job, JobKind, JobQueue
from pacs.pixels import StoredImage, read_image

log = logging.getLogger(__name__)

# How long an idle thread that is not the one looking rests before it looks itself.
_RESTING_S = 1.0


@dataclass(frozen=True)
class WorkerSettings:
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    threads: int = 0
    runs: int = 0
    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_attempts: int = 3
    lease_seconds: float = 300.0
    destinations: tuple[Destination, ...] = ()
    ae_title: str = "FILMLESS"


class Worker:
    def __init__(
        self,
        archive: Archive,
        queue: JobQueue,
        models: ModelStore,
        *,
        name: str,
        settings: WorkerSettings = WorkerSettings(),
    ) -> None:
        self.archive = archive
        self.queue = queue
        self.models = models
        self.name = name
        self.settings = settings
        self.device_uid = derived_uid("filmless device", name)
        self._sessions: dict[str, BatchingSession] = {}
        self._writers: dict[str, ReportWriter] = {}
        self.inputs = SharedInputs()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._looking = threading.Lock()

    def session(self, manifest: Manifest, folder: Path) -> BatchingSession:
        """One shared session per model (and weights file), created on first use."""
        key = f"{manifest.name}:{manifest.weights.sha256}"
        with self._lock:
            if key not in self._sessions:
                s = self.settings
                self._sessions[key] = BatchingSession(
                    folder / manifest.weights.file,
                    providers=s.providers,
                    threads=s.threads,
                    runs=s.runs,
                    max_batch=s.max_batch,
                    max_wait_ms=s.max_wait_ms,
                )
            return self._sessions[key]

    def writer(self, manifest: Manifest) -> ReportWriter:
        """One report writer per model, kept with what it has compiled."""
        key = f"{manifest.name}:{manifest.version}:{manifest.weights.sha256}"
        with self._lock:
            if key not in self._writers:
                self._writers[key] = ReportWriter(manifest, self.device_uid)
            return self._writers[key]

    def close(self) -> None:
        with self._lock:
            for session in self._sessions.values():
                session.close()
            self._sessions.clear()

    def run_once(self) -> bool:
        """Handle one due job; False when there was none."""
        job = self.queue.claim(
            self.name,
            lease=self.settings.lease_seconds,
            max_attempts=self.settings.max_attempts,
            # Routing's sends are its senders' (pacs.router), never a screening thread's.
            kinds=(JobKind.SCREEN, JobKind.FORWARD),
        )
        if job is None:
            return False
        self._wake.set()
        try:
            with self._renewing(job):
                result, note = self.process(job)
        except NotAssessable as exc:
            # The quality gate: skipped with what was measured, and the report saying so.
            self.queue.skip(job, str(exc), result=exc.report)
            log.info("%s: %s", job.model, exc)
        except (Unusable, UndecodablePixels) as exc:
            # Not for this model, or pixels beyond what is decoded (max_pixels, a frame
            # whose codestream claims more than its header): skipped before decoding.
            self.queue.skip(job, str(exc))
            log.info(
                "%s skipped %s: %s", job.model, job.SOPInstanceUID or job.StudyInstanceUID, exc
            )
        except NotFound as exc:
            # The images were deleted since the job was queued: nothing to screen.
            self.queue.skip(job, f"the images it reads were deleted: {exc}")
        except UnreportableSource as exc:
            # Running it again cannot help: failed now, with what the image lacks.
            self.queue.fail(job, f"no report can be written: {exc}", max_attempts=job.attempts)
            log.warning("%s failed on job %d: %s", job.model, job.id, exc)
        except Exception as exc:  # any failure is recorded on the job, never lost
            log.exception("%s failed on job %d", job.model, job.id)
            self.queue.fail(
                job, f"{type(exc).__name__}: {exc}", max_attempts=self.settings.max_attempts
            )
        else:
            if not self.queue.complete(job, result, note=note):
                log.warning("job %d lost its lease; its report stays the latest run's", job.id)
        return True

    @contextmanager
    def _renewing(self, job: Job) -> Iterator[None]:
        """Renew the job's lease while it runs, so that a long job (a large study on a
        busy machine) is never taken for abandoned and run a second time beside it."""
        done = threading.Event()
        every = self.settings.lease_seconds / 3

        def renew() -> None:
            while not done.wait(every):
                try:
                    if not self.queue.renew(job, self.settings.lease_seconds):
                        return
                except PacsError:
                    log.warning("job %d: the lease could not be renewed now", job.id)

        renewer = threading.Thread(target=renew, name=f"lease-{job.id}", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            done.set()
            renewer.join()

    def wake(self, *_: object) -> None:
        """Something may be due now (this process's scheduler queued jobs)."""
        self._wake.set()

    def run(self, stop: threading.Event, idle: float = 0.5) -> None:
        """Jobs until ``stop``. When there is none, a thread waits to be woken; one of the
        idle threads at a time also looks again every ``idle`` seconds, for jobs queued
        by other processes (another node's scheduler, ``jobs backfill``, ``jobs retry``)
        and retries whose pause ran out, so that N idle threads do not each query the
        index beside the archive's writers. A thread that finds a job wakes the others:
        more may be due."""
        while not stop.is_set():
            if self.run_once():
                continue
            if self._looking.acquire(blocking=False):
                try:
                    self._wake.wait(idle)
                finally:
                    self._looking.release()
            else:
                self._wake.wait(_RESTING_S)
            self._wake.clear()

    def process(self, job: Job) -> tuple[str, str]:
        """Run the job: the SOP Instance UID of the report (or the one sent), and what
        the job's record should say besides (an exam's ungradable eye)."""
        if job.kind == JobKind.FORWARD:
            return self._forward(job), ""
        installed = self.models.get(job.model)
        manifest = installed.manifest
        runner = self.session(manifest, installed.folder)
        unreadable = None
        note = ""
        maps: list[EncodedReport] = []
        try:
            if manifest.routing.level == "instance":
                (record,) = self.archive.records(
                    job.StudyInstanceUID, SOPInstanceUID=job.SOPInstanceUID
                )
                tensor, header, placement = self._read(record, manifest)
                outputs = dict(
                    zip([o.name for o in manifest.outputs], runner.infer(tensor), strict=True)
                )
                readings = []
                if manifest.task == "fundus":
                    box = organ_box(tensor, placement, manifest.preprocessing)
                    readings.append(fundus_reading(manifest, outputs, header, box))
                made = [
                    parametric_map(
                        manifest,
                        header,
                        heatmap,
                        job=_job_key(job),
                        instance_number=number,
                        device_uid=self.device_uid,
                    )
                    for number, heatmap in enumerate(
                        heatmaps(manifest, outputs, findings(manifest, outputs), placement), 1
                    )
                ]
                maps = [encoded(pm) for pm in made]
                report = self.writer(manifest).write(
                    [header],
                    outputs,
                    job=_job_key(job),
                    readings=readings,
                    placements=[placement],
                    evidence=made,
                )
                sources = [record.SOPInstanceUID]
            else:
                report, sources, note = self._study(job, manifest, runner.infer)
        except NotAssessable as exc:
            # Reported as such (no finding, nothing to read as negative), and the job
            # keeps the reason.
            if exc.source is None:  # raised by _read, which names its image
                raise
            unreadable = exc
            report = encoded(
                not_assessable_report(
                    manifest,
                    [exc.source],
                    exc.measures.named(),
                    [s.measure for s in exc.shortfalls],
                    job=_job_key(job),
                    device_uid=self.device_uid,
                )
            )
            sources = [str(exc.source.SOPInstanceUID)]
        try:
            # The maps first: a stored report never lists what is not in the archive.
            for pm in maps:
                self._store(pm, sources)
            stored = self._store(report, sources)
        except SourceGone as exc:
            raise Unusable(f"the report was dropped: {exc}") from exc
        if manifest.parametric_maps and manifest.routing.level == "instance":
            # Maps of an earlier run of this job for findings that are no longer among
            # those mapped.
            # Read first: most jobs have none, and a delete takes the index's write lock.
            possible = set(map_uids(manifest, _job_key(job))) - {m.SOPInstanceUID for m in maps}
            series = series_uid(job.StudyInstanceUID, manifest)
            stale = [
                r.SOPInstanceUID
                for r in self.archive.index.records(job.StudyInstanceUID, series)
                if r.SOPInstanceUID in possible
            ]
            if stale:
                self.archive.delete_all(stale)
        self.archive.audit.record(
            AuditEvent.STORE,
            self.actor(job),
            Outcome.SUCCESS,
            StudyInstanceUID=job.StudyInstanceUID,
            detail=f"report {stored} of {manifest.name} {manifest.version}"
            + (f" with {len(maps)} parametric maps" if maps else "")
            + (" (not assessable)" if unreadable else ""),
        )
        for target in self.settings.destinations:
            self.queue.enqueue(target.job_model, job.StudyInstanceUID, stored)
        if unreadable is not None:
            unreadable.report = stored
            raise unreadable
        return stored, note

    def _forward(self, job: Job) -> str:
        name = job.name
        target = next((d for d in self.settings.destinations if d.name == name), None)
        if target is None:
            raise Unusable(f"destination {name} is no longer configured")
        (record,) = self.archive.records(job.StudyInstanceUID, SOPInstanceUID=job.SOPInstanceUID)
        try:
            with self.archive.open(record) as stream:  # as stored
                send(target, stream, calling_ae=self.settings.ae_title)
        except Exception as exc:
            self.archive.audit.record(
                AuditEvent.RETRIEVE,
                self.actor(job),
                Outcome.MINOR_FAILURE,
                StudyInstanceUID=job.StudyInstanceUID,
                detail=f"report {job.SOPInstanceUID} not sent to {target.name}: {exc}",
            )
            raise
        self.archive.audit.record(
            AuditEvent.RETRIEVE,
            self.actor(job),
            Outcome.SUCCESS,
            StudyInstanceUID=job.StudyInstanceUID,
            detail=f"report {job.SOPInstanceUID} sent to {target.name}",
        )
        return job.SOPInstanceUID

    def actor(self, job: Job) -> Actor:
        """Who acts for the audit trail: this server's screening, and which job."""
        return Actor(f"filmless screening {job.model}", self.name, "filmless")

    def _read(
        self, record: InstanceRecord, manifest: Manifest, image: StoredImage | None = None
    ) -> tuple[np.ndarray, Dataset, Placement | None]:
        """The model input, the header and where the input lies on the image, parsing
        the file's header once; prepared once for every model that reads the image the
        same way (:mod:`inference.inputs`)."""
        p, q = manifest.preprocessing, manifest.quality
        key = (
            record.SOPInstanceUID,
            record.sha256,
            p.model_dump_json(),
            "" if q is None else q.model_dump_json(),
        )

        def made() -> Input:
            with self.archive.open_parsed(record) as stream:
                read = image or read_image(stream)
                try:
                    prepared = prepare(stream, p, read, q)
                except NotAssessable as exc:
                    exc.source = read.header
                    raise
            return Input(prepared.tensor, read.header, prepared.placement)

        found = self.inputs.get(key, made)
        return found.tensor, found.header, found.placement

    def _study(
        self, job: Job, manifest: Manifest, infer: Callable[[np.ndarray], list[np.ndarray]]
    ) -> tuple[EncodedReport, list[str], str]:
        """Every usable view, then the manifest's aggregation per breast and per exam;
        the report, the SOP Instance UIDs of the views it was made from, and a note."""
        # Decided on the stored headers, as the scheduler decided to queue the job; only
        # the images a model reads are then read.
        records = self.archive.records(job.StudyInstanceUID)
        facts = self.archive.index.stored_facts(StudyInstanceUID=job.StudyInstanceUID)
        values = [
            (r, StoredValues(unpack(facts[r.SOPInstanceUID].attributes)))
            for r in records
            if r.SOPInstanceUID in facts
        ]
        chosen = [(r, v) for r, v in values if (d := decide(v, manifest)) is not None and d.runs]
        missing = missing_views([v for _, v in chosen], manifest)
        if missing:
            raise Unusable(f"views missing from the study: {', '.join(missing)}")
        usable: list[tuple[InstanceRecord, StoredImage, StoredValues]] = []
        for record, value in chosen:
            with self.archive.open_parsed(record) as stream:
                usable.append((record, read_image(stream), value))
        if manifest.task in EYE_TASKS:
            return self._eyes(job, manifest, infer, [(r, i) for r, i, _ in usable])
        assert manifest.aggregation is not None
        sources = []
        views = []
        names = [o.name for o in manifest.outputs]
        for record, image, value in usable:
            try:
                tensor, header, placement = self._read(record, manifest, image)
            except NotAssessable as exc:
                where = f"the {view(value)} view"
                raise NotAssessable(
                    exc.measures, exc.shortfalls, where=where, source=exc.source
                ) from exc
            sources.append(header)
            box = organ_box(tensor, placement, manifest.preprocessing)
            named = dict(zip(names, infer(tensor), strict=True))
            views.append(View(view(value), header, named, box, placement))
        found, per_breast = aggregate(manifest, views)
        readings = breast_readings(manifest, views, per_breast)
        report = self.writer(manifest).write(sources, found, job=_job_key(job), readings=readings)
        return report, [r.SOPInstanceUID for r, _i, _v in usable], ""

    def _eyes(
        self,
        job: Job,
        manifest: Manifest,
        infer: Callable[[np.ndarray], list[np.ndarray]],
        usable: list[tuple[InstanceRecord, StoredImage]],
    ) -> tuple[EncodedReport, list[str], str]:
        """A fundus exam: every photograph through the quality gate and the model, then
        each eye and the exam (:mod:`inference.eyes`). An ungradable photograph is part
        of the report, and the note says what it measured; only when none can be graded
        is the exam not assessable."""
        names = [o.name for o in manifest.outputs]
        views: list[View] = []
        unreadable: list[NotAssessable] = []
        for record, image in usable:
            try:
                tensor, header, placement = self._read(record, manifest, image)
            except NotAssessable as exc:
                unreadable.append(exc)
                continue
            # A glaucoma reading is drawn on the optic disc, a DR reading on the retina.
            where = optic_disc if manifest.task == "glaucoma" else organ_box
            box = where(tensor, placement, manifest.preprocessing)
            named = dict(zip(names, infer(tensor), strict=True))
            views.append(View(laterality(header), header, named, box, placement))
        if not views:
            raise unreadable[0]
        failed = [
            Ungradable(
                exc.source,
                tuple(exc.measures.named()),
                tuple(s.measure for s in exc.shortfalls),
            )
            for exc in unreadable
            if exc.source is not None
        ]
        result = exam(manifest, views, failed)
        sources = [v.header for v in views] + [u.header for u in failed]
        report = self.writer(manifest).write(
            sources,
            result.found,
            job=_job_key(job),
            readings=result.readings,
            ungradable=result.ungradable,
        )
        note = "; ".join(
            f"{SIDES.get(laterality(exc.source), 'unknown')} eye {exc}"
            for exc in unreadable
            if exc.source is not None
        )
        return report, [r.SOPInstanceUID for r, _ in usable], note

    def _store(self, report: EncodedReport, sources: list[str]) -> str:
        source = InstanceSource.from_data_set(
            io.BytesIO(report.data),
            TransferSyntaxUID=ExplicitVRLittleEndian,
            SOPClassUID=report.SOPClassUID,
            SOPInstanceUID=report.SOPInstanceUID,
        )
        self.archive.ingest(
            source, Origin.INFERENCE, duplicate_policy="overwrite", requires=sources
        )
        return report.SOPInstanceUID


def _job_key(job: Job) -> str:
    return f"{job.model}/{job.StudyInstanceUID}/{job.SOPInstanceUID}"
