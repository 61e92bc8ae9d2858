"""``filmless serve``: the archive, its DIMSE server (one process or a pool), until a signal."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType

import uvicorn

from dicomweb.app import create_app
from dicomweb.auth import OidcVerifier, parse_tokens
from dicomweb.hosts import LOOPBACK_NAMES
from filmless import heap, viewer
from filmless.dimse_pool import DimsePool
from filmless.settings import Settings
from filmless.wiring import (
    build_archive,
    dimse_config,
    dimse_worker_count,
    follow_changes,
    release_orphans,
    start_routing,
    start_screening,
)
from pacs.archive import Archive
from pacs.dimse.server import start_dimse
from pacs.lock import ArchiveLock
from pacs.verify import reconcile

log = logging.getLogger("filmless")


def oidc_verifier(settings: Settings) -> OidcVerifier | None:
    if not settings.oidc_jwks_file:
        return None
    return OidcVerifier(
        Path(settings.oidc_jwks_file), issuer=settings.oidc_issuer, audience=settings.oidc_audience
    )


def allowed_hosts(settings: Settings) -> list[str]:
    """The Host names DICOMweb answers: loopback, the bind address, this machine's names
    when it listens on all of them, and the configured ones."""
    names = [*LOOPBACK_NAMES, settings.bind_address, *settings.allowed_hosts]
    if settings.bind_address in ("0.0.0.0", "::"):
        names += [socket.gethostname(), socket.getfqdn()]
    return names


def start_http(archive: Archive, settings: Settings) -> uvicorn.Server:
    """DICOMweb in a thread of the main process; the caller sets ``should_exit``."""
    config = uvicorn.Config(
        create_app(
            archive,
            max_results=settings.max_find_matches,
            max_request_bytes=settings.max_request_bytes,
            cors_origins=settings.cors_origins,
            viewer_dir=settings.viewer_dir,
            viewer_missing=viewer.HOW_TO,
            api_tokens=parse_tokens(settings.api_tokens),
            oidc=oidc_verifier(settings),
            request_timeout=settings.request_timeout,
            case_insensitive_names=settings.case_insensitive_names,
            allowed_hosts=allowed_hosts(settings),
            max_uploads=settings.max_concurrent_uploads,
            max_query_keys=settings.max_query_keys,
            max_answer_bytes=settings.max_answer_bytes,
        ),
        host=settings.bind_address,
        port=settings.http_port,
        # X-Forwarded-For and -Proto only from the proxies named (uvicorn's default
        # believes anyone on loopback, who could then forge the audit trail's addresses).
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=list(settings.trusted_proxies) or None,
        limit_concurrency=settings.http_max_connections,
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="DICOMweb", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError(f"DICOMweb could not listen on port {settings.http_port}")
    return server


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    return stop


def _serve_worker(
    archive: Archive, settings: Settings, lock: ArchiveLock, stop: threading.Event
) -> None:
    """A node that only screens: it claims jobs from the shared queue, whoever stored
    the instances, and stores its reports like any node; it opens no port."""
    release_orphans(archive.index)
    if not settings.screening:
        log.warning("role worker with screening off: this node has nothing to do")
    screening = start_screening(archive, settings, stop) if settings.screening else None
    follow_changes(archive, settings, stop)
    log.info(
        "screening worker on index %s; blobs in %s",
        archive.index.url.render_as_string(hide_password=True),
        archive.store.location,
    )
    try:
        stop.wait()
    finally:
        if screening is not None:
            screening.close()
        lock.release()
        archive.index.dispose()


def serve(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM, then stop accepting and let open associations end."""
    archive = build_archive(settings)
    lock = ArchiveLock(settings.data_dir, archive.index, shared=archive.store.shared)
    lock.acquire()  # before anything moves: a second server fails here, changing nothing
    # Before anything is received: what a crash left behind. Blobs without a row are set
    # aside only when no other node shares the store (they could be its uploads).
    reconcile(archive, orphans=lock.alone)
    lock.share()
    stop = _stop_on_signals()
    if settings.role == "worker":
        _serve_worker(archive, settings, lock, stop)
        return
    workers = dimse_worker_count(settings)
    # Screening first: it loads torch and MONAI, and the ports open only once the process
    # is fully built, so no peer's first requests share the CPU with those imports.
    release_orphans(archive.index)
    screening = start_screening(archive, settings, stop) if settings.screening else None
    routing = start_routing(archive, settings, stop) if settings.routes else None
    # A study that becomes stable may be routed: the router looks at once.
    follow_changes(archive, settings, stop, then=routing.wake if routing else lambda: None)
    heap.settle()
    if workers > 1:
        pool = DimsePool(settings, workers)
        pool.start()
        stop_dimse = pool.stop
    else:
        server = start_dimse(archive, dimse_config(settings))
        stop_dimse = server.shutdown
    http = start_http(archive, settings)
    log.info("DICOMweb on http://%s:%d/dicom-web", settings.bind_address, settings.http_port)
    if settings.api_tokens or settings.oidc_jwks_file:
        log.info(
            "DICOMweb needs a bearer token (%d static; OIDC from %s)",
            len(settings.api_tokens),
            settings.oidc_issuer or "nobody",
        )
    if viewer.installed(settings.viewer_dir):
        log.info("viewer on http://%s:%d/viewer/", settings.bind_address, settings.http_port)
    else:
        log.warning("%s", viewer.HOW_TO)
    log.info(
        "DIMSE listening on %s:%d as AE %s (%d worker%s); blobs in %s; index %s",
        settings.bind_address,
        settings.dimse_port,
        settings.ae_title,
        workers,
        "s" if workers > 1 else "",
        archive.store.location,
        archive.index.url.render_as_string(hide_password=True),
    )
    try:
        stop.wait()
    finally:
        http.should_exit = True
        stop_dimse()
        if screening is not None:
            screening.close()
        lock.release()
        archive.index.dispose()
