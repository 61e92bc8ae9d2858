"""A model added to a running archive, run over what the archive already holds.

The scheduler makes jobs of what arrives; studies stored before a model was installed
never arrived for it. Backfill walks the index's instances (those received since a
date, or all), decides for each what the scheduler would have decided (the same routing
on the same stored header), and adds the job each target lacks: an instance job, a
study job once per study, or a skipped job with the reason. A target that already has
a job (any state: done, failed, pending) is left alone, so a backfill interrupted at any
point is simply run again, and none creates a job twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from inference.routing import decide
from models.manifest import Manifest
from pacs.attributes import StoredValues, unpack
from pacs.index import Index
from pacs.jobs import JobQueue


@dataclass
class Backfilled:
    """What a backfill did: instances it looked at, jobs it added to run and to record
    as skipped, targets that already had a job, and instances the model is not for."""

    instances: int = 0
    queued: int = 0
    skipped: int = 0
    existing: int = 0
    not_concerned: int = 0


def backfill(
    index: Index,
    queue: JobQueue,
    manifest: Manifest,
    *,
    since: datetime | None = None,
    without_view_position: bool = False,
    advance: Callable[[], None] = lambda: None,
) -> Backfilled:
    done = Backfilled()
    studies: set[str] = set()
    for found in (f for page in index.walk_facts(since=since) for f in page):
        study_uid, sop = found.StudyInstanceUID, found.SOPInstanceUID
        done.instances += 1
        values = StoredValues(unpack(found.attributes))  # what the scheduler routes by
        decision = decide(values, manifest, without_view_position=without_view_position)
        if decision is None:
            done.not_concerned += 1
        elif decision.runs and manifest.routing.level == "study":
            if study_uid not in studies:
                studies.add(study_uid)
                _count(done, queue.add_missing(manifest.name, study_uid), queued=True)
        elif decision.runs:
            _count(done, queue.add_missing(manifest.name, study_uid, sop), queued=True)
        else:
            added = queue.add_missing(manifest.name, study_uid, sop, reason=decision.reason)
            _count(done, added, queued=False)
        advance()
    return done


def _count(done: Backfilled, added: bool, *, queued: bool) -> None:
    if not added:
        done.existing += 1
    elif queued:
        done.queued += 1
    else:
        done.skipped += 1
