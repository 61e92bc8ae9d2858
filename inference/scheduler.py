"""Arriving instances become jobs: per instance at once, per study once it is stable.

Subscribed to the archive's "instance stored" events in every process that ingests.
The queue is in the database, so which process enqueues does not matter, and a restart
loses nothing that was enqueued.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from inference.routing import route, stored_values
from models.manifest import Manifest
from pacs.events import InstanceStored
from pacs.jobs import JobQueue

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        queue: JobQueue,
        manifests: Callable[[], Sequence[Manifest]],
        *,
        stable_seconds: float,
        without_view_position: bool = False,
    ) -> None:
        self.queue = queue
        self.manifests = manifests
        self.stable_seconds = stable_seconds
        self.without_view_position = without_view_position

    def __call__(self, event: InstanceStored) -> None:
        values = stored_values(event.header)
        study = event.record.StudyInstanceUID
        sop = event.record.SOPInstanceUID
        by_name = {m.name: m for m in self.manifests()}
        decisions = route(
            values, by_name.values(), without_view_position=self.without_view_position
        )
        for decision in decisions:
            manifest = by_name[decision.model]
            if manifest.routing.level == "study" and decision.runs:
                # Each new view pushes the study job back: it runs once the study is quiet
                # for stable_seconds, with whatever views it then has (a study short of
                # its views is then skipped, with the views it lacks as the reason).
                self.queue.enqueue(manifest.name, study, delay=self.stable_seconds)
            elif decision.runs:
                self.queue.enqueue(manifest.name, study, sop)
            else:
                # Not usable by the model, at either level: kept as a skipped job of the
                # instance, with the reason, never silently dropped.
                self.queue.record_skip(manifest.name, study, sop, decision.reason)
                log.info("%s not run on %s: %s", manifest.name, sop, decision.reason)
