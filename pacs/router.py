"""Routing to other archives: the change log's ``routes`` consumer and the senders.

The consumer turns each change into send jobs by the rules of :mod:`pacs.routes`: one
job per instance and destination (``route:<name>`` in the job queue), committed with
its cursor, so that nothing acknowledged is left unsent by a crash. The senders claim
those jobs, at most ``max_concurrent`` at a time per destination, a study's in the order
they were queued and in runs of up to ``RUN`` (one run of a study at a time), and send
the stored files as they are, by C-STORE over one association per run (kept open while
runs follow) or by STOW-RS; a run is recorded in one transaction. A send that fails
goes back to the queue with a pause that doubles at each attempt; one that keeps
failing stays ``failed`` with the reason, until ``filmless routes resend``. Sending an
instance twice is harmless: the peer answers Success for what it already holds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from pacs import jobs
from pacs.archive import Archive
from pacs.audit import Actor, AuditEvent, Outcome
from pacs.changes import Change, ChangeKind, Writes
from pacs.errors import NotFound, PacsError
from pacs.forward import Destination, Sender
from pacs.index import Index, StoredFacts
from pacs.jobs import Job, JobKind, JobQueue, JobRequest, put_jobs
from pacs.routes import Route, matches

log = logging.getLogger(__name__)

# How long a sender's association waits for the next instance (of the same SOP Class
# and transfer syntax) before it is released.
KEEP_S = 5.0
# Instances of one study claimed, sent and recorded together.
RUN = 32


def job_model(route: str) -> str:
    return jobs.job_model(JobKind.ROUTE, route)


@dataclass(frozen=True)
class Routed:
    """A rule with where it sends and how."""

    route: Route
    destination: Destination
    max_concurrent: int = 2
    retry_seconds: float = 5.0


class Router:
    """The consumer ``routes`` of the change log."""

    name = "routes"

    def __init__(
        self, index: Index, routes: Sequence[Routed], *, then: Callable[[], None] = lambda: None
    ) -> None:
        self.index = index
        self.routes = list(routes)
        self.then = then

    def prepare(self, changes: Sequence[Change]) -> Writes | None:
        by_instance = [r for r in self.routes if r.route.trigger == "instance"]
        by_study = [r for r in self.routes if r.route.trigger == "stable"]
        targets: list[tuple[str, StoredFacts]] = []
        arrived = [c for c in changes if c.kind in (ChangeKind.STORED, ChangeKind.REPLACED)]
        if by_instance and arrived:
            # What the index holds now: an instance deleted meanwhile is not sent.
            facts = self.index.stored_facts(SOPInstanceUIDs=[c.SOPInstanceUID for c in arrived])
            for c in arrived:
                if (found := facts.get(c.SOPInstanceUID)) is not None:
                    targets += [(r.route.name, found) for r in by_instance if _for(r, found)]
        if by_study:
            for c in changes:
                if c.kind == ChangeKind.STABLE:
                    facts = self.index.stored_facts(StudyInstanceUID=c.StudyInstanceUID)
                    for found in facts.values():
                        targets += [(r.route.name, found) for r in by_study if _for(r, found)]
        if not targets:
            return None

        requests = [
            JobRequest(job_model(name), found.StudyInstanceUID, found.SOPInstanceUID)
            for name, found in targets
        ]

        def writes(conn: Connection) -> None:
            put_jobs(conn, requests)

        return writes

    def committed(self) -> None:
        self.then()


def _for(routed: Routed, facts: StoredFacts) -> bool:
    return matches(routed.route, facts.values())


@dataclass
class Backfilled:
    """What a route's backfill did: instances looked at, sends queued, instances that
    already had a send (in any state), and instances the rule does not match."""

    instances: int = 0
    queued: int = 0
    existing: int = 0
    not_matched: int = 0


def backfill(
    index: Index,
    routed: Routed,
    *,
    since: datetime | None = None,
    advance: Callable[[], None] = lambda: None,
) -> Backfilled:
    """Queue the sends a route added later would have made for what was already stored,
    as dcm4chee exports existing studies on request; Orthanc leaves this to a script.

    The rule is applied to the same stored facts the consumer decides by, in the order
    the instances were stored (so each study's go out in order). An instance that
    already has a send of this route, sent, failed or pending, is left as it is (``routes
    resend`` sends again): an interrupted backfill is simply run again.
    """
    queue = JobQueue(index)
    model = job_model(routed.route.name)
    done = Backfilled()
    for page in index.walk_facts(since=since):
        for found in page:
            done.instances += 1
            if not _for(routed, found):
                done.not_matched += 1
            elif queue.add_missing(model, found.StudyInstanceUID, found.SOPInstanceUID):
                done.queued += 1
            else:
                done.existing += 1
            advance()
    return done


class Senders:
    """Threads that send the queued instances, ``max_concurrent`` per destination."""

    def __init__(
        self,
        archive: Archive,
        routes: Sequence[Routed],
        *,
        ae_title: str,
        name: str,
        max_attempts: int,
    ) -> None:
        self.archive = archive
        self.queue = JobQueue(archive.index)
        self.routes: Mapping[str, Routed] = {r.route.name: r for r in routes}
        self.ae_title = ae_title
        self.name = name
        self.max_attempts = max_attempts
        self._wake = threading.Event()

    def wake(self, *_: object) -> None:
        self._wake.set()

    def run_once(self, route: str, sender: Sender | None = None) -> bool:
        """Send the next due run of a study's instances for ``route`` (up to ``RUN``);
        False when none was due. ``sender``: the calling thread's, which keeps its
        association open for the next run."""
        routed = self.routes[route]
        jobs = self.queue.claim_run(
            self.name, job_model(route), limit=RUN, max_attempts=self.max_attempts
        )
        if not jobs:
            return False
        own = sender is None
        sender = sender or Sender(routed.destination, calling_ae=self.ae_title)
        sent: list[Job] = []
        try:
            records = self.archive.index.by_uid([j.SOPInstanceUID for j in jobs])
            for n, job in enumerate(jobs):
                try:
                    record = records.get(job.SOPInstanceUID)
                    if record is None:
                        raise NotFound(f"instance {job.SOPInstanceUID} is not in the archive")
                    with self.archive.open(record) as stream:
                        sender.send(stream)  # as stored
                except NotFound:
                    self.queue.skip(job, "deleted before it was sent")
                except Exception as exc:  # kept on the job, with the reason, tried again
                    log.warning("%s: %s not sent: %s", route, job.SOPInstanceUID, exc)
                    self._audit(routed, job.StudyInstanceUID, 1, f"not sent: {exc}")
                    self.queue.fail(
                        job, str(exc), max_attempts=self.max_attempts, backoff=routed.retry_seconds
                    )
                    self.queue.release(jobs[n + 1 :])  # the study waits behind it
                    break
                else:
                    sent.append(job)
        finally:
            self.queue.complete_all(sent)
            if sent:
                self._audit(routed, jobs[0].StudyInstanceUID, len(sent), "sent")
            if own:
                sender.close()
        return True

    def _audit(self, routed: Routed, study: str, count: int, what: str) -> None:
        protocol = "DICOMweb" if routed.destination.is_stow else "DIMSE"
        self.archive.audit.record(
            AuditEvent.RETRIEVE,
            Actor(self.ae_title, "", protocol),
            Outcome.SUCCESS if what == "sent" else Outcome.MINOR_FAILURE,
            StudyInstanceUID=study,
            detail=f"{count} instance(s) to {routed.destination.name}: {what}",
        )

    def run(self, route: str, stop: threading.Event, idle: float = 0.5) -> None:
        sender = Sender(self.routes[route].destination, calling_ae=self.ae_title, keep=KEEP_S)
        try:
            while not stop.is_set():
                try:
                    if self.run_once(route, sender):
                        continue
                except PacsError as exc:  # the index is away: the jobs wait in it
                    log.warning("%s: no job claimed now: %s", route, exc)
                sender.close()  # nothing due: the peer gets its association back
                self._wake.wait(idle)
                self._wake.clear()
        finally:
            sender.close()

    def start(self, stop: threading.Event) -> list[threading.Thread]:
        threads = []
        for name, routed in self.routes.items():
            for n in range(routed.max_concurrent):
                thread = threading.Thread(
                    target=self.run, args=(name, stop), name=f"route-{name}-{n}", daemon=True
                )
                thread.start()
                threads.append(thread)
        return threads
