"""Stored instances become jobs: per instance at once, per study once it is stable.

The scheduler follows the archive's change log (:mod:`pacs.changes`), not the ingest
call: the jobs of a batch of changes commit together with the cursor that says the batch
is done. An instance stored by any process (a DIMSE worker, STOW-RS, ``filmless
import``) becomes its jobs once, even if the process that stored it, or this one, is
killed in between, and a failure while routing is retried, not logged and lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from sqlalchemy import Connection

from inference.routing import route
from models.manifest import Manifest
from pacs.attributes import StoredValues, unpack
from pacs.changes import Change, ChangeKind, Writes
from pacs.index import Index
from pacs.jobs import JobRequest, JobState, put_jobs

log = logging.getLogger(__name__)


class Scheduler:
    """The consumer ``screening`` of the change log."""

    name = "screening"

    def __init__(
        self,
        index: Index,
        manifests: Callable[[], Sequence[Manifest]],
        *,
        stable_seconds: float,
        without_view_position: bool = False,
        then: Callable[[], None] = lambda: None,
    ) -> None:
        self.index = index
        self.manifests = manifests
        self.stable_seconds = stable_seconds
        self.without_view_position = without_view_position
        self.then = then

    def prepare(self, changes: Sequence[Change]) -> Writes | None:
        arrived = [c for c in changes if c.kind in (ChangeKind.STORED, ChangeKind.REPLACED)]
        manifests = list(self.manifests())
        if not arrived or not manifests:
            return None
        # Routed by what the index holds now: an instance deleted since has no jobs.
        facts = self.index.stored_facts(SOPInstanceUIDs=[c.SOPInstanceUID for c in arrived])
        requests: list[JobRequest] = []
        for c in arrived:
            found = facts.get(c.SOPInstanceUID)
            if found is not None:
                values = StoredValues(unpack(found.attributes))
                requests += self.requests(c.StudyInstanceUID, c.SOPInstanceUID, values, manifests)
        if not requests:
            return None

        def writes(conn: Connection) -> None:
            put_jobs(conn, requests)

        return writes

    def requests(
        self, study: str, sop: str, values: StoredValues, manifests: Sequence[Manifest]
    ) -> list[JobRequest]:
        """The jobs one stored instance asks for, by the manifests' routing rules."""
        by_name = {m.name: m for m in manifests}
        found = []
        for decision in route(values, manifests, without_view_position=self.without_view_position):
            manifest = by_name[decision.model]
            if manifest.routing.level == "study" and decision.runs:
                # Each new view pushes the study job back: it runs once the study is quiet
                # for stable_seconds, with whatever views it then has (a study short of
                # its views is then skipped, with the views it lacks as the reason).
                found.append(JobRequest(manifest.name, study, delay=self.stable_seconds))
            elif decision.runs:
                found.append(JobRequest(manifest.name, study, sop))
            else:
                # Not usable by the model, at either level: kept as a skipped job of the
                # instance, with the reason, never silently dropped.
                found.append(
                    JobRequest(manifest.name, study, sop, JobState.SKIPPED, decision.reason)
                )
                log.info("%s not run on %s: %s", manifest.name, sop, decision.reason)
        return found

    def committed(self) -> None:
        self.then()
