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

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from inference.routing import decide
from models.manifest import Manifest
from pacs.attributes import StoredValues, unpack
from pacs.index import Index, instance, series, study
from pacs.jobs import JobQueue

PAGE = 500  # instances read per query, in id order


@dataclass
class Backfilled:
    """What a backfill did: instances it looked at, jobs it added to run and to record
    as skipped, targets that already had a job, and instances the model is not for."""

    instances: int = 0
    queued: int = 0
    skipped: int = 0
    existing: int = 0
    not_concerned: int = 0


def count(index: Index, since: datetime | None) -> int:
    statement = select(func.count()).select_from(instance)
    if since is not None:
        statement = statement.where(instance.c.received_at >= since)
    with index.reading() as conn:
        return int(conn.execute(statement).scalar_one())


def _instances(index: Index, since: datetime | None) -> Iterator[tuple[str, str, bytes]]:
    """(StudyInstanceUID, SOPInstanceUID, packed header) of each instance, in id order,
    a page at a time (keyset paging: rows stored meanwhile are seen or not, never twice)."""
    last = 0
    while True:
        statement = (
            select(
                instance.c.id,
                study.c.StudyInstanceUID,
                instance.c.SOPInstanceUID,
                instance.c.attributes,
            )
            .join(series, instance.c.series_id == series.c.id)
            .join(study, series.c.study_id == study.c.id)
            .where(instance.c.id > last)
            .order_by(instance.c.id)
            .limit(PAGE)
        )
        if since is not None:
            statement = statement.where(instance.c.received_at >= since)
        with index.reading() as conn:
            rows = conn.execute(statement).all()
        if not rows:
            return
        for row in rows:
            yield row.StudyInstanceUID, row.SOPInstanceUID, row.attributes
        last = rows[-1].id


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
    for study_uid, sop, packed in _instances(index, since):
        done.instances += 1
        values = StoredValues(unpack(packed))  # what the scheduler routes by
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
