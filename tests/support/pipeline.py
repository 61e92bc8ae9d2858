"""Screening in one process, as ``filmless serve`` wires it: the scheduler following
the change log, a worker, and a way to run every due job. The scheduler catches up
within each ingest call here, so that a test sees the jobs as soon as ``ingest``
returns; the server follows the log in a thread of its own."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from inference.scheduler import Scheduler
from inference.worker import Worker
from models.manifest import Manifest
from models.store import ModelStore
from pacs.archive import Archive
from pacs.changes import ChangeLog, Follower
from pacs.jobs import JobQueue


def pipeline(archive: Archive, models_dir: Path, name: str = "w1") -> tuple[JobQueue, Worker]:
    store = ModelStore(models_dir)
    queue = JobQueue(archive.index)
    follower = scheduling(archive, lambda: [m.manifest for m in store.installed()])
    archive.events.subscribe(follower.catch_up)
    return queue, Worker(archive, queue, store, name=name)


def scheduling(
    archive: Archive, manifests: Callable[[], Sequence[Manifest]], stable_seconds: float = 0
) -> Follower:
    """The scheduler's follower of the change log, from where the log is now."""
    log = ChangeLog(archive.index)
    log.begin(Scheduler.name)
    return Follower(log, Scheduler(archive.index, manifests, stable_seconds=stable_seconds))


def drain(worker: Worker) -> None:
    """Run jobs until none is due."""
    while worker.run_once():
        pass
