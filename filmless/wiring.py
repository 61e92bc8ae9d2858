"""Builds the running parts from the settings: the archive, the DIMSE configuration, logging."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from pynetdicom import _config as pynetdicom_config
from rich.console import Console
from rich.logging import RichHandler

from filmless.settings import Settings
from inference.scheduler import Scheduler
from models.store import ModelStore
from pacs import pixels
from pacs.archive import Archive
from pacs.audit import AuditTrail
from pacs.changes import ChangeLog, Follower, StudyStability
from pacs.dimse.server import DimseConfig
from pacs.events import EventBus
from pacs.forward import destination
from pacs.index import Index
from pacs.jobs import JobQueue, JobState
from pacs.router import Routed, Router, Senders
from pacs.routes import check_route
from pacs.store import BlobStore, FsBlobStore

if TYPE_CHECKING:
    from inference.worker import Worker

log = logging.getLogger("filmless")


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}


class PrintableRecords(logging.Filter):
    """Control characters in a message (a UID or AE title a peer sent with a newline in
    it) are escaped, so that no peer can forge a line of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = message.translate(_CONTROL)
        if escaped != message:
            record.msg, record.args = escaped, None
        return True


def configure_logging(*, verbose: bool) -> None:
    """Rich output on a terminal; one plain line per record under a service manager."""
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(console=Console(stderr=True), show_path=False)
        handler.setFormatter(logging.Formatter("%(processName)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
        )
    handler.addFilter(PrintableRecords())
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True
    )
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose else logging.WARNING)
    # Whatever its logger's level, pynetdicom decodes and pretty-prints every request
    # identifier, and its standard handlers format every PDU and DIMSE message: only
    # when they would be shown.
    pynetdicom_config.LOG_HANDLER_LEVEL = "standard" if verbose else "none"
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = verbose
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = verbose
    # highdicom logs every module it copies into a report at INFO: lines per report.
    logging.getLogger("highdicom").setLevel(logging.DEBUG if verbose else logging.WARNING)


def dimse_worker_count(settings: Settings) -> int:
    return settings.dimse_workers or os.cpu_count() or 1


def blob_store(settings: Settings) -> BlobStore:
    """Object storage when a bucket is set, else files under the data folder; staging is
    on this node's disk in both cases."""
    if not settings.s3_bucket:
        return FsBlobStore(settings.data_dir)
    from pacs.objectstore import S3BlobStore

    return S3BlobStore(
        settings.data_dir,
        bucket=settings.s3_bucket,
        endpoint=settings.s3_endpoint,
        prefix=settings.s3_prefix,
        region=settings.s3_region,
        access_key_id=settings.s3_access_key_id,
        secret_access_key=settings.s3_secret_access_key,
    )


def build_archive(settings: Settings, *, create_schema: bool = True) -> Archive:
    """The archive of a process; with screening on, what it stores becomes jobs."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    pixels.LIMITS.max_pixels = settings.max_pixels
    index = Index(settings.index_url)
    if create_schema:
        index.create_schema()
    archive = Archive(
        blob_store(settings),
        index,
        EventBus(),
        duplicate_policy=settings.duplicate_policy,
        patient_policy=settings.patient_conflict,
        audit=AuditTrail(settings.audit_log),
        max_instance_bytes=settings.max_instance_bytes,
    )
    if settings.screening:
        # What this process stores from now on is screened, whichever process follows
        # the change log (``start_screening``), now or after a restart.
        ChangeLog(index).begin(Scheduler.name)
    if settings.routes:
        ChangeLog(index).begin(Router.name)  # the same for the routing rules
    return archive


def routed(settings: Settings) -> list[Routed]:
    return [
        Routed(
            check_route(name, rule.match, rule.trigger),
            destination(name, rule.destination, rule.token),
            max_concurrent=rule.max_concurrent,
            retry_seconds=rule.retry_seconds,
        )
        for name, rule in settings.routes.items()
    ]


def start_routing(archive: Archive, settings: Settings, stop: threading.Event) -> Follower:
    """The routing rules: the consumer that queues the sends (returned), and the
    senders."""
    routes = routed(settings)
    senders = Senders(
        archive,
        routes,
        ae_title=settings.ae_title,
        name=f"{socket.gethostname()}-{os.getpid()}",
        max_attempts=settings.job_max_attempts,
    )
    follower = Follower(ChangeLog(archive.index), Router(archive.index, routes, then=senders.wake))
    follower.start(stop)
    archive.events.subscribe(follower.wake)
    senders.start(stop)
    return follower


def follow_changes(
    archive: Archive,
    settings: Settings,
    stop: threading.Event,
    then: Callable[[], None] = lambda: None,
) -> Follower:
    """The consumers of the change log that every server runs (screening's and the
    routes' are started with them): studies become stable after
    ``study_stable_seconds`` without a change; ``then`` is told when some did."""
    stability = StudyStability(archive.index, settings.study_stable_seconds)
    log = ChangeLog(archive.index)
    log.begin(stability.name)

    def sweep() -> None:
        if stability.sweep():
            then()

    follower = Follower(log, stability, also=sweep)
    follower.start(stop)
    return follower


def start_screening(archive: Archive, settings: Settings, stop: threading.Event) -> Worker:
    """The scheduler following the change log, and worker threads over the job queue
    (sharing one session per model).

    Preprocessing uses MONAI's transforms, which load torch; imported here so that the
    other commands (and a server with screening off) start without it.
    """
    from inference.worker import Worker, WorkerSettings

    models = ModelStore(settings.models_dir)
    queue = JobQueue(archive.index)
    worker = Worker(
        archive,
        queue,
        models,
        name=f"{socket.gethostname()}-{os.getpid()}",
        settings=WorkerSettings(
            providers=tuple(settings.inference_providers),
            threads=settings.inference_threads,
            runs=settings.inference_runs,
            max_batch=settings.inference_max_batch,
            max_wait_ms=settings.inference_max_wait_ms,
            max_attempts=settings.job_max_attempts,
            destinations=tuple(
                destination(name, address) for name, address in settings.result_destinations.items()
            ),
            ae_title=settings.ae_title,
        ),
    )
    scheduler = Scheduler(
        archive.index,
        models.manifests,
        stable_seconds=settings.study_stable_seconds,
        without_view_position=settings.screen_without_view_position,
        then=worker.wake,
    )
    follower = Follower(ChangeLog(archive.index), scheduler)
    follower.start(stop)
    # Stored in this process: looked at now rather than at the next poll.
    archive.events.subscribe(follower.wake)
    for n in range(settings.inference_workers):
        threading.Thread(
            target=worker.run, args=(stop,), name=f"screening-{n}", daemon=True
        ).start()
    return worker


def release_orphans(index: Index) -> None:
    """Jobs left running by processes of this machine that are gone (``kill -9``): due
    again now, not once their lease runs out."""
    queue = JobQueue(index)
    orphans = [j.id for j in queue.jobs(JobState.RUNNING) if _is_dead_here(j.worker)]
    if queue.expire(orphans):
        log.info("%d job(s) of stopped processes will run again", len(orphans))


def _is_dead_here(worker: str) -> bool:
    """Whether a worker name (``host-pid``) is a process of this machine that is gone."""
    host, _, pid = worker.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# DimseConfig fields that are not settings: how the server is built, not configured.
NOT_SETTINGS = {"direct_associations"}


def dimse_config(settings: Settings) -> DimseConfig:
    """The settings' projection onto the DIMSE server's configuration: those whose
    shape differs, and every other field from the setting of the same name."""
    converted: dict[str, Any] = {
        "port": settings.dimse_port,
        "allowed_calling_aets": tuple(settings.allowed_calling_aets),
        "calling_aets_by_network": tuple(
            (network, tuple(titles)) for network, titles in settings.calling_aets_by_network.items()
        ),
        "move_destinations": tuple(
            (title, address.rpartition(":")[0], int(address.rpartition(":")[2]))
            for title, address in settings.move_destinations.items()
        ),
    }
    same = {
        f.name: getattr(settings, f.name)
        for f in fields(DimseConfig)
        if f.name in Settings.model_fields and f.name not in converted
    }
    return DimseConfig(**same, **converted)
