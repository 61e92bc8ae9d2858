"""Screening in one process, as ``filmless serve`` wires it: the scheduler on the
archive's events, a worker, and a way to run every due job."""

from __future__ import annotations

from pathlib import Path

from inference.scheduler import Scheduler
from inference.worker import Worker
from models.store import ModelStore
from pacs.archive import Archive
from pacs.jobs import JobQueue


def pipeline(archive: Archive, models_dir: Path, name: str = "w1") -> tuple[JobQueue, Worker]:
    store = ModelStore(models_dir)
    queue = JobQueue(archive.index)
    archive.events.subscribe(
        Scheduler(queue, lambda: [m.manifest for m in store.installed()], stable_seconds=0)
    )
    return queue, Worker(archive, queue, store, name=name)


def drain(worker: Worker) -> None:
    """Run jobs until none is due."""
    while worker.run_once():
        pass
